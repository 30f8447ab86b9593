// Following a build's or a MicroVM's log through the logs route (/_openmicrovm/logs/...): each
// request waits up to a few seconds for new lines, so a follower costs little and sees a line
// about as soon as it is written.
import { send } from "../api.js";
import { encodePathLabel } from "./sigv4.js";
import { h } from "../ui.js";

const MAX_LINES_SHOWN = 5000;

export async function followLog(kind, id, output, signal, { onState } = {}) {
  let after = 0;
  for (;;) {
    if (signal.aborted) return;
    const url = `${location.origin}/_openmicrovm/logs/${kind}/${encodePathLabel(id)}?after=${after}&wait=5`;
    const page = await send("GET", url, { signal });
    if (page.skippedBytes) output.append(h("div", { class: "muted" }, `… ${page.skippedBytes} bytes rotated away before they were shown`));
    appendLines(output, page.lines || []);
    if (onState) onState(page);
    after = page.nextOffset;
    if (page.loggingDisabled) {
      output.append(h("div", { class: "muted" }, "Logging is disabled for this resource: nothing is kept."));
      return;
    }
    if (page.finished && (page.lines || []).length === 0) return;
  }
}

function appendLines(output, lines) {
  if (!lines.length) return;
  const atBottom = output.scrollHeight - output.scrollTop - output.clientHeight < 24;
  for (const line of lines) {
    const space = line.indexOf(" ");
    const when = space > 0 ? line.slice(0, space) : "";
    const text = space > 0 ? line.slice(space + 1) : line;
    output.append(h("div", { class: "line" }, h("span", { class: "when" }, when.slice(11, 23)), " ", text));
  }
  while (output.childElementCount > MAX_LINES_SHOWN) output.firstElementChild.remove();
  if (atBottom) output.scrollTop = output.scrollHeight;
}
