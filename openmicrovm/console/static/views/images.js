// Images: the list, and one image with its versions (every field of a version summary) and their
// builds, whose logs follow the build as it runs.
import { call, listAll } from "../api.js";
import { followLog } from "../lib/logs.js";
import { errorBox, every, fields, formatTime, h, imageNameOf, redraw, replace, stateBadge, table } from "../ui.js";

const REFRESH_SECONDS = 2;
const VERSIONS_WITH_BUILDS = 5;
const BUILDING = new Set(["PENDING", "IN_PROGRESS"]);

export async function renderImages(view, _params, signal) {
  const errorSlot = h("div");
  const listSlot = h("div");
  replace(
    view,
    h("h1", {}, "Images"),
    h("div", { class: "toolbar" }, h("span", { class: "grow" }), h("a", { class: "button", href: "#/deploy" }, "Deploy an image")),
    errorSlot,
    listSlot,
  );
  await every(REFRESH_SECONDS, signal, async () => {
    const images = await listAll("ListMicrovmImages", {}, { signal });
    images.sort((a, b) => a.name.localeCompare(b.name));
    redraw(listSlot, JSON.stringify(images), () =>
      table(
        [
          ["Name", (image) => h("a", { href: `#/images/${encodeURIComponent(image.imageArn)}` }, image.name)],
          ["State", (image) => stateBadge(image.state)],
          ["Latest active", (image) => image.latestActiveImageVersion ?? "—"],
          ["Latest failed", (image) => image.latestFailedImageVersion ?? "—"],
          ["Created", (image) => formatTime(image.createdAt)],
        ],
        images,
        { empty: "No images yet. Deploy a folder with a Dockerfile to make one.", label: "Images" },
      ),
    );
  }, errorSlot);
}

// A field's value as text: nested structures (hooks, resources, ...) as indented JSON.
function shown(value) {
  if (value === undefined || value === null) return "—";
  if (typeof value === "object") return h("pre", { class: "mono" }, JSON.stringify(value, null, 2));
  return String(value);
}

const TIMESTAMP_FIELDS = new Set(["createdAt", "updatedAt"]);
const FIRST_FIELDS = ["imageVersion", "state", "status", "stateReason", "baseImageArn", "baseImageVersion", "createdAt", "updatedAt"];

function versionFields(version) {
  const names = [...FIRST_FIELDS, ...Object.keys(version).filter((name) => !FIRST_FIELDS.includes(name))];
  return fields(
    names
      .filter((name) => name in version)
      .map((name) => [
        name,
        name === "state" || name === "status" ? stateBadge(version[name])
          : TIMESTAMP_FIELDS.has(name) ? formatTime(version[name])
            : shown(version[name]),
      ]),
  );
}

// The API names an image by its ARN (a name is refused, as on AWS), so the page's link holds it.
export async function renderImage(view, [arn], signal) {
  const name = imageNameOf(arn);
  const errorSlot = h("div");
  const header = h("div");
  const versionsSlot = h("div");
  const logs = new Map(); // buildId → its log element, kept across refreshes
  const opened = new Set(); // build ids whose log is shown
  let followedNewest = false;

  const logFor = (build) => {
    if (!logs.has(build.buildId)) {
      const output = h("pre", { class: "log", tabindex: "0", "aria-label": `Build ${build.buildId} log` });
      const problems = h("div");
      logs.set(build.buildId, h("div", { class: "build-log", dataset: { build: build.buildId } }, problems, output));
      followLog("builds", build.buildId, output, signal).catch((error) => {
        if (error.name !== "AbortError") replace(problems, errorBox(error, "Reading the build log"));
      });
    }
    return logs.get(build.buildId);
  };

  const buildRows = (builds) =>
    builds.map((build) => {
      const open = opened.has(build.buildId);
      const toggle = h("button", { type: "button", "aria-expanded": String(open) }, open ? "Hide log" : "Show log");
      toggle.addEventListener("click", () => {
        if (opened.has(build.buildId)) opened.delete(build.buildId);
        else opened.add(build.buildId);
        refresh();
      });
      return h(
        "div",
        { class: "card" },
        h("div", { class: "toolbar" }, h("span", { class: "mono" }, build.buildId), stateBadge(build.buildState), toggle),
        fields([
          ["Architecture", build.architecture],
          ["Chipset", `${build.chipset ?? "—"} ${build.chipsetGeneration ?? ""}`],
          ["Created", formatTime(build.createdAt)],
          build.stateReason ? ["Reason", build.stateReason] : null,
          build.snapshotBuild ? ["Snapshot", shown(build.snapshotBuild)] : null,
        ]),
        open ? logFor(build) : "",
      );
    });

  const refresh = async () => {
    const image = await call("GetMicrovmImage", { imageIdentifier: arn }, { signal });
    const versions = await listAll("ListMicrovmImageVersions", { imageIdentifier: arn }, { signal });
    versions.sort((a, b) => Number(b.imageVersion) - Number(a.imageVersion));
    const withBuilds = await Promise.all(
      versions.slice(0, VERSIONS_WITH_BUILDS).map((version) =>
        listAll("ListMicrovmImageBuilds", { imageIdentifier: arn, imageVersion: version.imageVersion }, { signal })),
    );
    // Watching a build: the newest one's log opens by itself while it runs (after a deploy).
    const newest = withBuilds[0]?.slice().sort((a, b) => (a.createdAt < b.createdAt ? 1 : -1))[0];
    if (newest && !followedNewest && BUILDING.has(newest.buildState)) {
      opened.add(newest.buildId);
      followedNewest = true;
    }
    redraw(header, JSON.stringify(image), () =>
      fields([
        ["State", stateBadge(image.state)],
        ["ARN", h("span", { class: "mono" }, image.imageArn)],
        ["Latest active version", image.latestActiveImageVersion ?? "—"],
        ["Latest failed version", image.latestFailedImageVersion ?? "—"],
        ["Created", formatTime(image.createdAt)],
        ["Updated", formatTime(image.updatedAt)],
      ]),
    );
    redraw(versionsSlot, JSON.stringify([versions, withBuilds, [...opened]]), () =>
      versions.length ? versions.map((version, index) =>
        h(
          "section",
          { class: "version", dataset: { version: version.imageVersion }, "aria-label": `Version ${version.imageVersion}` },
          h("h2", {}, `Version ${version.imageVersion} `, stateBadge(version.state)),
          versionFields(version),
          index < VERSIONS_WITH_BUILDS ? [h("h3", {}, "Builds"), buildRows(withBuilds[index] || [])] : "",
        )) : h("p", { class: "muted" }, "No versions."),
    );
  };

  replace(view, h("p", {}, h("a", { href: "#/images" }, "← Images")), h("h1", {}, name), errorSlot, header, versionsSlot);
  await every(REFRESH_SECONDS, signal, refresh, errorSlot);
}
