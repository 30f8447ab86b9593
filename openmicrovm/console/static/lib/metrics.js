// Reading /metrics (the Prometheus text format) for one MicroVM's series.
import { send } from "../api.js";

// {name: {labelsKey: value}} for the lines whose labels include microvm_id="<id>".
export function seriesFor(text, microvmId) {
  const found = {};
  for (const line of text.split("\n")) {
    if (!line || line.startsWith("#")) continue;
    const match = /^([a-zA-Z_:][a-zA-Z0-9_:]*)\{([^}]*)\}\s+(\S+)/.exec(line);
    if (!match) continue;
    if (!match[2].includes(`microvm_id="${microvmId}"`)) continue;
    found[match[1]] = Number(match[3]);
  }
  return found;
}

export async function sampleMicrovm(microvmId, signal) {
  const text = await send("GET", `${location.origin}/metrics`, { signal, accept: "text" });
  return { at: performance.now() / 1000, values: seriesFor(text, microvmId) };
}
