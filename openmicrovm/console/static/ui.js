// Small DOM helpers shared by the views. Text always goes in as text nodes (never innerHTML), so a
// name, a log line or an error message from the server can never become markup or script.

export function h(tag, attributes = {}, ...children) {
  const element = document.createElement(tag);
  for (const [name, value] of Object.entries(attributes)) {
    if (value === undefined || value === null || value === false) continue;
    if (name.startsWith("on") && typeof value === "function") element.addEventListener(name.slice(2), value);
    else if (name === "dataset") Object.assign(element.dataset, value);
    else element.setAttribute(name, value === true ? "" : String(value));
  }
  append(element, children);
  return element;
}

function append(element, children) {
  for (const child of children.flat(Infinity)) {
    if (child === undefined || child === null || child === false) continue;
    element.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
}

export function replace(element, ...children) {
  element.replaceChildren();
  append(element, children);
}

const drawnFrom = new WeakMap();

// Redraws `element` only when what it shows changed (`key`, e.g. the JSON of its data): a live
// view that redrew every tick would take the keyboard focus away from its buttons and links.
export function redraw(element, key, build) {
  if (drawnFrom.get(element) === key) return;
  drawnFrom.set(element, key);
  replace(element, build());
}

const TONES = {
  RUNNING: "good", CREATED: "good", UPDATED: "good", SUCCESSFUL: "good", ACTIVE: "good",
  PENDING: "busy", IN_PROGRESS: "busy", CREATING: "busy", UPDATING: "busy", SUSPENDING: "busy",
  TERMINATING: "busy", DELETING: "busy",
  CREATE_FAILED: "bad", UPDATE_FAILED: "bad", FAILED: "bad", DELETE_FAILED: "bad",
  SUSPENDED: "idle", TERMINATED: "idle", DELETED: "idle", INACTIVE: "idle",
};

// A state in colour and in words: the colour is a help, the word is the information.
export function stateBadge(state) {
  return h("span", { class: "state", dataset: { tone: TONES[state] || "idle" } }, state || "—");
}

export function toDate(value) {
  if (value === undefined || value === null) return null;
  return typeof value === "number" ? new Date(value * 1000) : new Date(value);
}

export function formatTime(value) {
  const date = toDate(value);
  return date ? h("time", { datetime: date.toISOString(), title: date.toISOString() }, date.toLocaleString()) : "—";
}

export function duration(seconds) {
  if (seconds === undefined || seconds === null || Number.isNaN(seconds)) return "—";
  const s = Math.max(0, Math.round(seconds));
  if (s < 60) return `${s} s`;
  if (s < 3600) return `${Math.floor(s / 60)} min ${s % 60} s`;
  if (s < 86400) return `${Math.floor(s / 3600)} h ${Math.floor((s % 3600) / 60)} min`;
  return `${Math.floor(s / 86400)} d ${Math.floor((s % 86400) / 3600)} h`;
}

// Ages and countdowns tick in place (tickClocks, every second), so that the views around them need
// no redraw to stay true.
export function age(value) {
  const date = toDate(value);
  if (!date) return "—";
  return h("span", { class: "clock", dataset: { since: String(date.getTime()) } }, duration((Date.now() - date.getTime()) / 1000));
}

export function countdown(untilMs) {
  return h("span", { class: "clock", dataset: { until: String(untilMs) } }, duration((untilMs - Date.now()) / 1000));
}

export function tickClocks() {
  const now = Date.now();
  for (const clock of document.querySelectorAll(".clock")) {
    const { since, until } = clock.dataset;
    clock.textContent = duration(since ? (now - Number(since)) / 1000 : (Number(until) - now) / 1000);
  }
}

// An API error as the API wrote it: its code, its message, and the request id to find it in the
// server's log.
export function errorBox(error, doing) {
  const code = error.code || error.name || "Error";
  return h(
    "div",
    { class: "error", role: "alert" },
    doing ? `${doing}: ` : "",
    h("strong", { class: "error-code" }, code),
    " ",
    h("span", { class: "error-message" }, error.message || String(error)),
    error.requestId ? h("div", { class: "muted" }, `request ${error.requestId}`) : "",
  );
}

export function spinner(text = "Loading…") {
  return h("p", { class: "loading", "aria-busy": "true" }, h("span", { class: "spinner", "aria-hidden": "true" }), " ", text);
}

export function notice(content) {
  const box = document.getElementById("notice");
  replace(box, content || "");
}

// Runs `task` now and every `seconds` until the view's signal aborts; a failure is shown in
// `errorSlot` and retried on the next tick (a restarting server comes back by itself).
export function every(seconds, signal, task, errorSlot) {
  let timer = null;
  const tick = async () => {
    if (signal.aborted) return;
    try {
      await task();
      if (errorSlot) replace(errorSlot);
    } catch (error) {
      if (error.name === "AbortError" || signal.aborted) return;
      if (errorSlot) replace(errorSlot, errorBox(error, "Live update failed (retrying)"));
    }
    if (!signal.aborted) timer = setTimeout(tick, seconds * 1000);
  };
  signal.addEventListener("abort", () => clearTimeout(timer));
  return tick();
}

// A button that shows it is working, and is disabled, until its action settles; the action's
// error goes to `errorSlot` as the API wrote it.
export function actionButton(label, action, { errorSlot, className, busyLabel } = {}) {
  const button = h("button", { type: "button", class: className }, label);
  button.addEventListener("click", async () => {
    button.disabled = true;
    replace(button, h("span", { class: "spinner", "aria-hidden": "true" }), " ", busyLabel || label);
    if (errorSlot) replace(errorSlot);
    try {
      await action();
    } catch (error) {
      if (errorSlot) replace(errorSlot, errorBox(error, label));
    } finally {
      button.disabled = false;
      replace(button, label);
    }
  });
  return button;
}

export function fields(pairs) {
  return h("dl", { class: "fields" }, pairs.filter(Boolean).map(([name, value]) => [h("dt", {}, name), h("dd", {}, value ?? "—")]));
}

export function table(columns, rows, { empty = "Nothing here yet.", label } = {}) {
  if (!rows.length) return h("p", { class: "muted" }, empty);
  return h(
    "div",
    { class: "table-wrap" },
    h(
      "table",
      { class: "responsive", "aria-label": label },
      h("thead", {}, h("tr", {}, columns.map(([title]) => h("th", { scope: "col" }, title)))),
      h("tbody", {}, rows.map((row) => h("tr", {}, columns.map(([title, cell]) => h("td", { "data-label": title }, cell(row)))))),
    ),
  );
}

export function imageNameOf(arn) {
  return arn ? arn.split(":").pop().split("/").pop() : "";
}
