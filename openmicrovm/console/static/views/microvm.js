// One MicroVM: its fields (live), suspend/resume/terminate, its log as it is written, charts of its
// memory, CPU and endpoint traffic sampled from /metrics while the page is open, and a terminal on
// its shell when it was run with SHELL_INGRESS (or ALL_INGRESS).
import { call } from "../api.js";
import { Chart } from "../lib/chart.js";
import { followLog } from "../lib/logs.js";
import { sampleMicrovm } from "../lib/metrics.js";
import { openTerminal } from "../terminal.js";
import {
  actionButton, age, duration, errorBox, every, fields, formatTime, h, imageNameOf, redraw, replace, stateBadge,
} from "../ui.js";

const REFRESH_SECONDS = 2;
const SAMPLE_SECONDS = 2;
const SHELL_CONNECTORS = ["SHELL_INGRESS", "ALL_INGRESS"];
const HTTP_CONNECTORS = ["HTTP_INGRESS", "ALL_INGRESS"];
const SHELL_TOKEN_MINUTES = 60;
const ENDPOINT_TOKEN_MINUTES = 60;
// A tab sends no X-aws-proxy-port header: the endpoint serves its default port.
const ENDPOINT_DEFAULT_PORT = 8080;
// The endpoint's path that turns a token into a cookie of its host (endpoint/browser_login.py).
const ENDPOINT_LOGIN_PATH = "/.openmicrovm/login";

// The lifecycle buttons a MicroVM in this state can take (the list and the page share them).
export function lifecycleActions(microvm, { errorSlot, after }) {
  const id = microvm.microvmId;
  const act = (operation) => async () => {
    await call(operation, { microvmIdentifier: id });
    if (after) await after();
  };
  const buttons = [];
  if (microvm.state === "RUNNING") buttons.push(actionButton("Suspend", act("SuspendMicrovm"), { errorSlot, busyLabel: "Suspending…" }));
  if (microvm.state === "SUSPENDED") buttons.push(actionButton("Resume", act("ResumeMicrovm"), { errorSlot, busyLabel: "Resuming…" }));
  if (microvm.state !== "TERMINATED" && microvm.state !== "TERMINATING") {
    buttons.push(actionButton("Terminate", act("TerminateMicrovm"), { errorSlot, className: "danger", busyLabel: "Terminating…" }));
  }
  return h("span", { class: "toolbar" }, buttons);
}

function connectorNames(arns) {
  return (arns || []).map((arn) => arn.split(":").pop());
}

// The endpoint's origin as this page reaches the server: same scheme and port, the MicroVM's host.
function endpointOrigin(microvm, websocket = false) {
  const secure = location.protocol === "https:";
  const scheme = websocket ? (secure ? "wss" : "ws") : (secure ? "https" : "http");
  return `${scheme}://${microvm.endpoint}${location.port ? `:${location.port}` : ""}`;
}

// A new tab on the endpoint with a fresh token. The tab is opened at once (a tab opened after an
// await may be taken for a pop-up) and cut from this page (its opener could navigate the console).
async function openEndpoint(microvm) {
  const tab = window.open("about:blank", "_blank");
  if (tab) tab.opener = null;
  try {
    const answer = await call("CreateMicrovmAuthToken", {
      microvmIdentifier: microvm.microvmId,
      expirationInMinutes: ENDPOINT_TOKEN_MINUTES,
      allowedPorts: [{ port: ENDPOINT_DEFAULT_PORT }],
    });
    const token = answer.authToken["X-aws-proxy-auth"];
    const url = `${endpointOrigin(microvm)}${ENDPOINT_LOGIN_PATH}?token=${encodeURIComponent(token)}`;
    if (tab) tab.location.replace(url);
    else window.open(url, "_blank", "noopener");
  } catch (error) {
    if (tab) tab.close();
    throw error;
  }
}

export async function renderMicrovm(view, [id], signal) {
  let microvm = await call("GetMicrovm", { microvmIdentifier: id }, { signal });
  const errorSlot = h("div");
  const actionErrors = h("div");
  const summary = h("div");
  const actions = h("div");
  const draw = () => {
    const idle = microvm.idlePolicy || {};
    redraw(summary, JSON.stringify(microvm), () =>
      fields([
        ["State", h("span", {}, stateBadge(microvm.state), microvm.stateReason ? h("span", { class: "muted" }, " ", microvm.stateReason) : "")],
        ["Image", h("a", { href: `#/images/${encodeURIComponent(microvm.imageArn)}` }, `${imageNameOf(microvm.imageArn)} v${microvm.imageVersion}`)],
        ["Endpoint", h("span", { class: "mono" }, microvm.endpoint)],
        ["Started", h("span", {}, formatTime(microvm.startedAt), " (", age(microvm.startedAt), " ago)")],
        microvm.terminatedAt ? ["Terminated", formatTime(microvm.terminatedAt)] : null,
        ["Idle policy", idle.maxIdleDurationSeconds
          ? `suspend after ${duration(idle.maxIdleDurationSeconds)} idle${idle.suspendedDurationSeconds ? `, terminate after ${duration(idle.suspendedDurationSeconds)} suspended` : ""}${idle.autoResumeEnabled ? ", resume on traffic" : ""}`
          : "none"],
        ["Maximum duration", microvm.maximumDurationInSeconds ? duration(microvm.maximumDurationInSeconds) : "—"],
        ["Ingress", connectorNames(microvm.ingressNetworkConnectors).join(", ") || "—"],
        ["Egress", connectorNames(microvm.egressNetworkConnectors).join(", ") || "—"],
      ]),
    );
    const reachable = HTTP_CONNECTORS.some((kind) => connectorNames(microvm.ingressNetworkConnectors).includes(kind));
    redraw(actions, microvm.state, () =>
      h("div", { class: "toolbar" },
        lifecycleActions(microvm, { errorSlot: actionErrors, after: refresh }),
        reachable && microvm.state !== "TERMINATED"
          ? actionButton("Open endpoint ↗", () => openEndpoint(microvm), { errorSlot: actionErrors, busyLabel: "Opening…" })
          : ""),
    );
  };
  const refresh = async () => {
    microvm = await call("GetMicrovm", { microvmIdentifier: id }, { signal });
    draw();
  };
  draw();

  const log = h("pre", { class: "log", tabindex: "0", "aria-label": "MicroVM log" });
  const logErrors = h("div");
  const charts = {
    memory: new Chart("Memory", "MiB"),
    cpu: new Chart("CPU", "%"),
    traffic: new Chart("Endpoint traffic", "KiB/s"),
  };
  const chartErrors = h("div");
  const shell = SHELL_CONNECTORS.some((kind) => connectorNames(microvm.ingressNetworkConnectors).includes(kind));

  replace(
    view,
    h("p", {}, h("a", { href: "#/microvms" }, "← MicroVMs")),
    h("h1", { class: "mono" }, id),
    errorSlot,
    actions,
    actionErrors,
    summary,
    h("h2", {}, "Metrics ", h("span", { class: "muted" }, `(sampled every ${SAMPLE_SECONDS} s while this page is open)`)),
    chartErrors,
    h("div", { class: "grid" }, Object.values(charts).map((chart) => chart.element)),
    h("h2", {}, "Terminal"),
    shell
      ? terminalPanel(microvm, signal)
      : h("p", { class: "muted" }, "This MicroVM was run without SHELL_INGRESS (or ALL_INGRESS), so it has no shell."),
    h("h2", {}, "Log"),
    logErrors,
    log,
  );
  followLog("microvms", id, log, signal).catch((error) => {
    if (error.name !== "AbortError") replace(logErrors, errorBox(error, "Reading the log"));
  });
  sampleCharts(id, charts, signal, chartErrors);
  await every(REFRESH_SECONDS, signal, refresh, errorSlot);
}

function sampleCharts(id, charts, signal, errorSlot) {
  let previous = null;
  every(SAMPLE_SECONDS, signal, async () => {
    const sample = await sampleMicrovm(id, signal);
    const values = sample.values;
    const rss = values.openmicrovm_sandbox_rss_bytes;
    charts.memory.add(rss === undefined ? undefined : rss / 1048576);
    if (previous) {
      const seconds = sample.at - previous.at;
      const rate = (name) => {
        const now = values[name];
        const before = previous.values[name] ?? 0;
        return now === undefined ? undefined : Math.max(0, now - before) / seconds;
      };
      const cpu = rate("openmicrovm_sandbox_cpu_seconds_total") ?? rate("openmicrovm_sandbox_cpu_seconds");
      charts.cpu.add(cpu === undefined ? undefined : cpu * 100);
      const traffic = rate("openmicrovm_microvm_endpoint_bytes_total");
      charts.traffic.add(traffic === undefined ? 0 : traffic / 1024);
    }
    previous = sample;
  }, errorSlot);
}

function terminalPanel(microvm, signal) {
  const slot = h("div", { class: "terminal", id: "terminal" });
  const status = h("span", { class: "muted", role: "status" }, "Not connected.");
  let session = null;
  const close = () => {
    if (session) session.close();
    session = null;
  };
  signal.addEventListener("abort", close);
  const connect = async () => {
    close();
    const answer = await call("CreateMicrovmShellAuthToken", { microvmIdentifier: microvm.microvmId, expirationInMinutes: SHELL_TOKEN_MINUTES }, { signal });
    const token = answer.authToken["X-aws-proxy-auth"];
    replace(slot);
    session = await openTerminal(slot, {
      url: `${endpointOrigin(microvm, true)}/shell`,
      protocols: ["lambda-microvms", `lambda-microvms.authentication.${token}`, "lambda-microvms.port.8022"],
      onStatus: (kind, text) => replace(status, text ? `${kind}: ${text}` : kind),
    });
  };
  const errors = h("div");
  return h(
    "div",
    {},
    h("div", { class: "toolbar" }, actionButton("Open terminal", connect, { errorSlot: errors, busyLabel: "Connecting…" }), status),
    errors,
    slot,
  );
}
