// A small line chart in SVG for the samples a page took while open: no library needed.
import { h } from "../ui.js";

const SVG = "http://www.w3.org/2000/svg";
const KEPT_POINTS = 90;

export class Chart {
  constructor(title, unit) {
    this.unit = unit;
    this.points = [];
    this.value = h("span", { class: "value" }, "—");
    this.svg = document.createElementNS(SVG, "svg");
    this.svg.setAttribute("viewBox", "0 0 100 100");
    this.svg.setAttribute("preserveAspectRatio", "none");
    this.svg.setAttribute("role", "img");
    this.svg.setAttribute("aria-label", `${title}, the last ${KEPT_POINTS} samples`);
    this.line = document.createElementNS(SVG, "polyline");
    this.svg.append(this.line);
    this.element = h("div", { class: "card chart" }, h("h3", {}, title, ": ", this.value), this.svg);
  }

  add(value) {
    if (value === undefined || Number.isNaN(value)) {
      this.value.textContent = "no data";
      return;
    }
    this.points.push(value);
    if (this.points.length > KEPT_POINTS) this.points.shift();
    this.value.textContent = `${value.toFixed(value < 10 ? 2 : 1)} ${this.unit}`;
    const top = Math.max(...this.points) || 1;
    const step = 100 / (KEPT_POINTS - 1);
    const start = KEPT_POINTS - this.points.length;
    this.line.setAttribute(
      "points",
      this.points.map((v, i) => `${((start + i) * step).toFixed(2)},${(100 - (v / top) * 95).toFixed(2)}`).join(" "),
    );
  }
}
