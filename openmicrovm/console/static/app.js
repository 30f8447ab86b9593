// The console's shell: load the wire model, find out whether the server wants signed calls, and
// route between views by the URL's fragment (#/microvms, #/images/<image ARN>, ...), so that the server
// serves one page and every view has a link of its own.
import { AUTH_ERRORS, call, credentials, loadModel, setCredentials, UNAUTHORIZED_EVENT } from "./api.js";
import { errorBox, h, notice, replace, spinner, tickClocks } from "./ui.js";
import { renderDeploy } from "./views/deploy.js";
import { renderImage, renderImages } from "./views/images.js";
import { renderMicrovm } from "./views/microvm.js";
import { renderMicrovms } from "./views/microvms.js";

const ROUTES = [
  [/^#\/microvms\/([^/]+)$/, renderMicrovm, "microvms"],
  [/^#\/microvms$/, renderMicrovms, "microvms"],
  [/^#\/images\/([^/]+)$/, renderImage, "images"],
  [/^#\/images$/, renderImages, "images"],
  [/^#\/deploy$/, renderDeploy, "deploy"],
];

const view = document.getElementById("view");
let current = null; // the AbortController of the view on screen
let signingIn = false; // the sign-in form is on screen: its own refusals are shown there

async function show() {
  if (current) current.abort();
  current = new AbortController();
  const hash = location.hash || "#/microvms";
  const [pattern, render, section] = ROUTES.find(([pattern]) => pattern.test(hash)) || [];
  for (const link of document.querySelectorAll("[data-nav]")) {
    if (link.dataset.nav === section) link.setAttribute("aria-current", "page");
    else link.removeAttribute("aria-current");
  }
  notice();
  if (!render) {
    replace(view, h("h1", {}, "Not found"), h("p", {}, "No page here. ", h("a", { href: "#/microvms" }, "Go to the MicroVMs.")));
    return;
  }
  const params = pattern.exec(hash).slice(1).map(decodeURIComponent);
  replace(view, spinner());
  try {
    await render(view, params, current.signal);
  } catch (error) {
    if (error.name === "AbortError") return;
    if (AUTH_ERRORS.has(error.code)) return; // the sign-in form has taken the view
    replace(view, errorBox(error));
  }
}

function showIdentity() {
  const keys = credentials();
  const slot = document.getElementById("identity");
  if (!keys) {
    replace(slot, "Unsigned calls");
    return;
  }
  replace(
    slot,
    `${keys.accessKeyId} · ${keys.region}`,
    h("button", { type: "button", onclick: () => { setCredentials(null); showLogin(); } }, "Sign out"),
  );
}

// Asks for an access key and secret when the server refused an unsigned or badly signed call.
function showLogin(error) {
  if (current) current.abort();
  signingIn = true;
  showIdentity();
  const problem = h("div", {}, error ? errorBox(error, "The server refused the call") : "");
  const form = h(
    "form",
    { class: "stack login", "aria-label": "Sign in" },
    h("h1", {}, "Sign in"),
    h("p", { class: "muted" }, "This server requires SigV4-signed calls. The keys stay in this tab (session storage) and sign each call here, in the browser."),
    problem,
    h("label", {}, "Access key ID", h("input", { name: "accessKeyId", required: true, autocomplete: "username", spellcheck: "false" })),
    h("label", {}, "Secret access key", h("input", { name: "secretAccessKey", type: "password", required: true, autocomplete: "current-password" })),
    h("label", {}, "Session token ", h("span", { class: "hint" }, "(optional)"), h("input", { name: "sessionToken", autocomplete: "off" })),
    h("label", {}, "Region", h("input", { name: "region", value: "us-east-1", required: true })),
    h("div", {}, h("button", { type: "submit", class: "primary" }, "Sign in")),
  );
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    const data = Object.fromEntries(new FormData(form));
    setCredentials({ ...data, accessKeyId: data.accessKeyId.trim(), region: data.region.trim() });
    replace(problem, spinner("Checking the keys…"));
    try {
      await call("ListMicrovmImages", { maxResults: 1 });
    } catch (failure) {
      setCredentials(null);
      replace(problem, errorBox(failure, "Sign-in failed"));
      return;
    }
    signingIn = false;
    showIdentity();
    show();
  });
  replace(view, form);
  form.querySelector("input").focus();
}

async function start() {
  try {
    await loadModel();
  } catch (error) {
    replace(view, errorBox(error));
    return;
  }
  showIdentity();
  setInterval(tickClocks, 1000);
  // The skip link moves the focus to the view; following its #fragment would change the route.
  document.querySelector(".skip").addEventListener("click", (event) => {
    event.preventDefault();
    view.focus();
  });
  window.addEventListener("hashchange", () => { if (!signingIn) show(); });
  window.addEventListener(UNAUTHORIZED_EVENT, (event) => { if (!signingIn) showLogin(event.detail); });
  await show();
}

start();
