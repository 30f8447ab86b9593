// The MicroVMs: a live list, and a form that runs one with every option RunMicrovm has.
import { call, listAll } from "../api.js";
import {
  age, countdown, duration, errorBox, every, h, imageNameOf, redraw, replace, spinner, stateBadge, table, toDate,
} from "../ui.js";
import { lifecycleActions } from "./microvm.js";

const REFRESH_SECONDS = 2;
const DETAIL_FETCHES_AT_ONCE = 6;
const CONNECTORS = {
  ingress: ["HTTP_INGRESS", "SHELL_INGRESS", "ALL_INGRESS", "NO_INGRESS"],
  egress: ["INTERNET_EGRESS"],
};

export function connectorArn(region, kind) {
  return `arn:aws:lambda:${region}:aws:network-connector:aws-network-connector:${kind}`;
}

export function regionOf(arn) {
  return (arn || "").split(":")[3];
}

// What ListMicrovms does not say (endpoint, idle policy, maximum duration) comes from one
// GetMicrovm per MicroVM, once (those never change during a MicroVM's life), and only for the rows
// on screen: a list of hundreds asks for a screenful, not for every MicroVM, each time it opens.
class Details {
  constructor(signal) {
    this.signal = signal;
    this.answers = new Map(); // id → GetMicrovm's answer, or null while asked
    this.queue = [];
    this.running = 0;
    this.onChange = () => {};
    this.visible = new IntersectionObserver((entries) => {
      for (const entry of entries) if (entry.isIntersecting) this.want(entry.target.dataset.microvm);
    });
    signal.addEventListener("abort", () => this.visible.disconnect());
  }

  get(id) {
    return this.answers.get(id);
  }

  // A cell that shows details: they are asked for once it is on screen.
  cell(id, content) {
    const element = h("span", { dataset: { microvm: id } }, content);
    if (!this.answers.get(id)) this.visible.observe(element);
    return element;
  }

  want(id) {
    if (this.answers.has(id)) return;
    this.answers.set(id, null);
    this.queue.push(id);
    this.pump();
  }

  pump() {
    while (this.running < DETAIL_FETCHES_AT_ONCE && this.queue.length) {
      const id = this.queue.shift();
      this.running += 1;
      call("GetMicrovm", { microvmIdentifier: id }, { signal: this.signal })
        .then((microvm) => { this.answers.set(id, microvm); this.onChange(); })
        .catch(() => this.answers.delete(id))
        .finally(() => { this.running -= 1; this.pump(); });
    }
  }
}

function timers(microvm, detail) {
  if (!detail) return "…";
  const parts = [];
  const idle = detail.idlePolicy || {};
  if (idle.maxIdleDurationSeconds) {
    parts.push(`idle → suspend after ${duration(idle.maxIdleDurationSeconds)}${idle.autoResumeEnabled ? ", auto-resume" : ""}`);
  }
  if (detail.maximumDurationInSeconds && microvm.state !== "TERMINATED") {
    const started = toDate(microvm.startedAt).getTime();
    parts.push(h("span", {}, "ends in ", countdown(started + detail.maximumDurationInSeconds * 1000)));
  }
  return parts.length ? parts.flatMap((part, index) => (index ? ["; ", part] : [part])) : "none";
}

export async function renderMicrovms(view, _params, signal) {
  const errorSlot = h("div");
  const actionErrors = h("div");
  const listSlot = h("div", { "aria-live": "off" });
  const showEnded = h("input", { type: "checkbox", id: "show-terminated" });
  const formSlot = h("div", {}, spinner("Loading the images to run…"));
  let focusWhenLoaded = false; // "Run a MicroVM" was pressed before the form was there
  const goToForm = () => {
    formSlot.scrollIntoView();
    const field = formSlot.querySelector("select, input");
    focusWhenLoaded = !field;
    if (field) field.focus();
  };
  const details = new Details(signal);
  let items = [];

  const draw = () => {
    const shown = showEnded.checked ? items : items.filter((m) => m.state !== "TERMINATED");
    shown.sort((a, b) => toDate(b.startedAt) - toDate(a.startedAt));
    const key = JSON.stringify([shown, shown.map((m) => Boolean(details.get(m.microvmId)))]);
    redraw(listSlot, key, () => {
      details.visible.disconnect(); // the cells it watched are being replaced
      return table(
        [
          ["MicroVM", (m) => h("a", { href: `#/microvms/${m.microvmId}`, class: "mono" }, m.microvmId)],
          ["State", (m) => stateBadge(m.state)],
          ["Image", (m) => h("a", { href: `#/images/${encodeURIComponent(m.imageArn)}` }, `${imageNameOf(m.imageArn)} v${m.imageVersion}`)],
          ["Endpoint", (m) => details.cell(m.microvmId, h("span", { class: "mono" }, details.get(m.microvmId)?.endpoint ?? "…"))],
          ["Age", (m) => age(m.startedAt)],
          ["Timers", (m) => details.cell(m.microvmId, timers(m, details.get(m.microvmId)))],
          ["Actions", (m) => lifecycleActions(m, { errorSlot: actionErrors, after: refresh })],
        ],
        shown,
        { empty: "No MicroVMs. Run one below, or deploy an image first.", label: "MicroVMs" },
      );
    });
  };
  // Answers to the detail fetches come one by one: one redraw per frame, not one per answer.
  let drawing = false;
  details.onChange = () => {
    if (drawing) return;
    drawing = true;
    requestAnimationFrame(() => { drawing = false; draw(); });
  };
  const refresh = async () => {
    items = await listAll("ListMicrovms", {}, { signal });
    draw();
  };
  showEnded.addEventListener("change", draw);

  replace(
    view,
    h("h1", {}, "MicroVMs"),
    h("div", { class: "toolbar" }, h("label", {}, showEnded, " Show terminated"), h("span", { class: "grow" }),
      // Not a #fragment link: the fragment is the console's route.
      h("button", { type: "button", onclick: goToForm }, "Run a MicroVM")),
    errorSlot,
    actionErrors,
    listSlot,
    formSlot,
  );
  // The list does not wait for the form's image list: both are asked for at once.
  runForm(signal, refresh)
    .then((form) => {
      replace(formSlot, form);
      if (focusWhenLoaded) goToForm();
    })
    .catch((error) => error.name === "AbortError" || replace(formSlot, errorBox(error, "Listing the images to run")));
  await every(REFRESH_SECONDS, signal, refresh, errorSlot);
}

async function runForm(signal, refresh) {
  const images = (await listAll("ListMicrovmImages", {}, { signal })).filter((image) => ["CREATED", "UPDATED", "UPDATING", "UPDATE_FAILED"].includes(image.state));
  const result = h("div", { "aria-live": "polite" });
  const checkboxes = (group, checked) =>
    h("fieldset", {}, h("legend", {}, group === "ingress" ? "Ingress connectors" : "Egress connectors"),
      CONNECTORS[group].map((kind) => h("label", {}, h("input", { type: "checkbox", name: group, value: kind, checked: checked.includes(kind) }), kind)));
  const form = h(
    "form",
    { class: "stack", id: "run", "aria-label": "Run a MicroVM" },
    h("h2", {}, "Run a MicroVM"),
    images.length
      ? h("label", {}, "Image", h("select", { name: "image", required: true }, images.map((image) => h("option", { value: image.imageArn }, `${image.name} (latest v${image.latestActiveImageVersion ?? "—"})`))))
      : h("p", { class: "muted" }, "No image is ready to run: ", h("a", { href: "#/deploy" }, "deploy one"), "."),
    h("label", {}, "Image version ", h("span", { class: "hint" }, "(empty: the latest active)"), h("input", { name: "imageVersion", inputmode: "numeric" })),
    h("label", {}, "Run hook payload", h("textarea", { name: "runHookPayload", rows: 2 })),
    h("label", {}, "Suspend after idle (seconds) ", h("span", { class: "hint" }, "(empty: never)"), h("input", { name: "maxIdleDurationSeconds", inputmode: "numeric" })),
    h("label", {}, "Terminate after suspended for (seconds) ", h("span", { class: "hint" }, "(empty: the default)"), h("input", { name: "suspendedDurationSeconds", inputmode: "numeric" })),
    h("label", {}, h("span", {}, h("input", { type: "checkbox", name: "autoResumeEnabled" }), " Resume automatically on endpoint traffic")),
    h("label", {}, "Maximum duration (seconds) ", h("span", { class: "hint" }, "(empty: the default)"), h("input", { name: "maximumDurationInSeconds", inputmode: "numeric" })),
    checkboxes("ingress", ["HTTP_INGRESS", "SHELL_INGRESS"]),
    checkboxes("egress", ["INTERNET_EGRESS"]),
    h("div", {}, h("button", { type: "submit", class: "primary", disabled: !images.length }, "Run")),
    result,
  );
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    const data = new FormData(form);
    const number = (name) => (data.get(name) ? Number(data.get(name)) : undefined);
    const region = regionOf(data.get("image"));
    const idlePolicy = {};
    if (data.get("maxIdleDurationSeconds")) idlePolicy.maxIdleDurationSeconds = number("maxIdleDurationSeconds");
    if (data.get("suspendedDurationSeconds")) idlePolicy.suspendedDurationSeconds = number("suspendedDurationSeconds");
    if (data.get("autoResumeEnabled")) idlePolicy.autoResumeEnabled = true;
    const params = {
      imageIdentifier: data.get("image"),
      imageVersion: data.get("imageVersion") || undefined,
      runHookPayload: data.get("runHookPayload") || undefined,
      maximumDurationInSeconds: number("maximumDurationInSeconds"),
      idlePolicy: Object.keys(idlePolicy).length ? idlePolicy : undefined,
      ingressNetworkConnectors: data.getAll("ingress").map((kind) => connectorArn(region, kind)),
      egressNetworkConnectors: data.getAll("egress").map((kind) => connectorArn(region, kind)),
    };
    const submit = form.querySelector("button[type=submit]");
    submit.disabled = true;
    replace(result, h("p", { class: "loading" }, h("span", { class: "spinner", "aria-hidden": "true" }), " Running…"));
    try {
      const microvm = await call("RunMicrovm", params, { signal });
      replace(result, h("p", { class: "ok" }, "Started ", h("a", { href: `#/microvms/${microvm.microvmId}`, class: "mono" }, microvm.microvmId), " (", microvm.state, ")."));
      await refresh();
    } catch (error) {
      if (error.name !== "AbortError") replace(result, errorBox(error, "RunMicrovm"));
    } finally {
      submit.disabled = false;
    }
  });
  return form;
}
