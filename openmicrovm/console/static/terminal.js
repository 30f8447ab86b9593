// An interactive shell in a MicroVM: xterm.js on the endpoint's shell WebSocket.
//
// xterm.js is not part of the checkout: install.sh fetches the pinned release from the npm
// registry into the server's cache dir (openmicrovm/console/vendor_install.py) and the server
// serves it below /console/vendor/. Its files are UMD bundles, loaded once with <script> tags;
// they define window.Terminal and window.FitAddon.
//
// The wire protocol is the server's (openmicrovm/endpoint/shell.py): text frames carry JSON
// control messages (session_init and exit from the server, resize from us), binary frames carry
// the terminal's bytes both ways.

const ASSETS = "/console/vendor/xterm/";
const RESIZE_DEBOUNCE_MS = 100;
const encoder = new TextEncoder();

let loading = null; // one load per page, shared by every terminal

function load(element, url) {
  return new Promise((resolve, reject) => {
    element.addEventListener("load", resolve, { once: true });
    element.addEventListener("error", () => reject(new Error(`cannot load ${url}`)), { once: true });
    document.head.append(element);
  });
}

// Resolves to {Terminal, FitAddon}; rejects when the assets are not installed.
function loadXterm(base) {
  if (loading === null) {
    const scripts = ["xterm.js", "addon-fit.js"].map((name) =>
      Object.assign(document.createElement("script"), { src: `${base}${name}` }),
    );
    // The stylesheet before the first terminal: xterm measures its cells from styled elements.
    const style = Object.assign(document.createElement("link"), {
      rel: "stylesheet",
      href: `${base}xterm.css`,
    });
    const elements = [...scripts, style];
    loading = Promise.all(elements.map((element) => load(element, element.src || element.href))).then(() => {
      if (typeof window.Terminal !== "function" || typeof window.FitAddon?.FitAddon !== "function") {
        throw new Error("xterm.js loaded but defined no Terminal or FitAddon");
      }
      return { Terminal: window.Terminal, FitAddon: window.FitAddon.FitAddon };
    });
    // Installing the assets and opening another terminal must work without reloading the page.
    loading.catch(() => {
      for (const element of elements) element.remove();
      loading = null;
    });
  }
  return loading;
}

function showMissing(container, error) {
  const note = document.createElement("div");
  note.className = "terminal-missing";
  note.setAttribute("role", "alert");
  const command = (text) => Object.assign(document.createElement("code"), { textContent: text });
  note.append(
    "The terminal cannot start: its assets (xterm.js) are missing from this server. On the server, run ",
    command("./install.sh"),
    " (or ",
    command("python -m openmicrovm.console.vendor_install"),
    "), then reload this page.",
  );
  note.title = String(error?.message ?? error);
  container.append(note);
  return note;
}

const CLOSE_WORDS = {
  1000: "the session ended",
  1001: "the endpoint went away (restarting or shutting down)",
  1006:
    "the connection was lost or refused: the MicroVM may have stopped, lack shell ingress, " +
    "or its token may be invalid",
  1008: "the endpoint refused the session",
  1011: "the endpoint failed while serving the session",
  1013: "the endpoint is busy: try again shortly",
};

function describeClose(code, reason) {
  if (code === 1008 && reason === "token expired") {
    return "the shell token expired: open the terminal again to get a new one (code 1008)";
  }
  const words = CLOSE_WORDS[code] ?? "the connection closed";
  return `${words} (code ${code}${reason ? `: ${reason}` : ""})`;
}

// http(s) URLs (or paths) become ws(s) URLs; the PTY starts at the terminal's size unless the
// caller chose one, so the first prompt is drawn for the right width.
function socketUrl(url, rows, cols) {
  const target = new URL(url, window.location.href);
  if (target.protocol === "http:") target.protocol = "ws:";
  if (target.protocol === "https:") target.protocol = "wss:";
  if (!target.searchParams.has("rows") && !target.searchParams.has("cols")) {
    target.searchParams.set("rows", String(rows));
    target.searchParams.set("cols", String(cols));
  }
  return target.href;
}

/**
 * Opens a terminal in `container` connected to the shell WebSocket at `url`.
 * `protocols`: the WebSocket subprotocols (the shell token travels in one of them).
 * `onStatus(kind, text, detail)`: kind is "connecting", "open", "exit" (detail.status), "closed"
 * (detail.code, detail.reason) or "error"; text says it in words.
 * Resolves to {terminal, close()}; terminal is null when xterm.js is not installed, and the
 * container then says how to install it.
 */
export async function openTerminal(
  container,
  { url, protocols = [], onStatus = () => {}, assets = ASSETS } = {},
) {
  let xterm;
  try {
    xterm = await loadXterm(assets);
  } catch (error) {
    const note = showMissing(container, error);
    onStatus("error", note.textContent);
    return { terminal: null, close: () => note.remove() };
  }

  const terminal = new xterm.Terminal({ cursorBlink: true, scrollback: 5000 });
  const fitAddon = new xterm.FitAddon();
  terminal.loadAddon(fitAddon);
  terminal.open(container);
  const fit = () => {
    try {
      fitAddon.fit();
    } catch {
      // A hidden container has no size to fit; the next resize fits it.
    }
  };
  fit();
  terminal.focus();

  let socket = null;
  let closed = false;
  let sentSize = "";
  let resizeTimer = 0;

  const sendSize = () => {
    const size = `${terminal.rows}x${terminal.cols}`;
    if (socket?.readyState !== WebSocket.OPEN || size === sentSize) return;
    socket.send(JSON.stringify({ type: "resize", rows: terminal.rows, cols: terminal.cols }));
    sentSize = size;
  };
  // Dragging a window edge resizes many times a second; the PTY needs only the final size.
  const scheduleResize = () => {
    clearTimeout(resizeTimer);
    resizeTimer = setTimeout(() => {
      if (closed) return;
      fit();
      sendSize();
    }, RESIZE_DEBOUNCE_MS);
  };
  const resizeObserver = new ResizeObserver(scheduleResize);
  resizeObserver.observe(container);
  terminal.onResize(scheduleResize);

  const sendBytes = (bytes) => {
    if (socket?.readyState === WebSocket.OPEN) socket.send(bytes);
  };
  terminal.onData((data) => sendBytes(encoder.encode(data)));
  // Some mouse reports are raw bytes, one per character code, not text.
  terminal.onBinary((data) => sendBytes(Uint8Array.from(data, (c) => c.charCodeAt(0) & 0xff)));

  const handleControl = (text) => {
    let message;
    try {
      message = JSON.parse(text);
    } catch {
      return; // not a control message of this protocol
    }
    if (message?.type === "session_init") {
      onStatus("open", `connected to ${message.microvmId} (session ${message.sessionId})`, message);
    } else if (message?.type === "exit") {
      onStatus("exit", `the shell exited with status ${message.status}`, { status: message.status });
    }
  };

  onStatus("connecting", "connecting to the shell…");
  try {
    socket = new WebSocket(socketUrl(url, terminal.rows, terminal.cols), protocols);
  } catch (error) {
    onStatus("error", `cannot open the shell's WebSocket: ${error.message}`);
  }
  if (socket !== null) {
    let opened = false;
    socket.binaryType = "arraybuffer";
    socket.addEventListener("open", () => {
      opened = true;
      sendSize();
    });
    socket.addEventListener("message", (event) => {
      if (typeof event.data === "string") handleControl(event.data);
      else if (!closed) terminal.write(new Uint8Array(event.data));
    });
    socket.addEventListener("error", () => {
      onStatus(
        "error",
        opened
          ? "the shell's connection failed"
          : "cannot connect to the shell: the endpoint refused or cannot be reached",
      );
    });
    socket.addEventListener("close", (event) => {
      if (!closed) terminal.options.disableStdin = true; // keystrokes would go nowhere
      onStatus("closed", describeClose(event.code, event.reason), { code: event.code, reason: event.reason });
    });
  }

  const close = () => {
    if (closed) return;
    closed = true;
    clearTimeout(resizeTimer);
    resizeObserver.disconnect();
    if (socket !== null && socket.readyState <= WebSocket.OPEN) socket.close(1000, "closed by the user");
    terminal.dispose();
  };
  return { terminal, close };
}
