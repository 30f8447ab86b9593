// Deploy: a folder (or a zip) with a Dockerfile, hooks and resources → an uploaded zip →
// CreateMicrovmImage (UpdateMicrovmImage for a name that exists) → the image's page, which follows
// the build's log.
import { call, listAll, send } from "../api.js";
import { zipFiles } from "../lib/zip.js";
import { errorBox, h, replace } from "../ui.js";

const DEFAULT_BUILD_ROLE = "arn:aws:iam::000000000000:role/openmicrovm-build";
const IMAGE_HOOKS = ["ready", "validate"];
const MICROVM_HOOKS = ["run", "resume", "suspend", "terminate"];
const BASE64_CHUNK = 0x8000;

function base64(bytes) {
  let binary = "";
  for (let i = 0; i < bytes.length; i += BASE64_CHUNK) binary += String.fromCharCode(...bytes.subarray(i, i + BASE64_CHUNK));
  return btoa(binary);
}

// Files picked with <input webkitdirectory> carry "folder/inner/path": the folder itself goes.
function withoutTopFolder(path) {
  const slash = path.indexOf("/");
  return slash >= 0 ? path.slice(slash + 1) : path;
}

// A dropped folder's files, each named by its path below `prefix` (the dropped folder itself: "").
async function readDirectory(directory, prefix, files) {
  const reader = directory.createReader();
  for (;;) {
    const batch = await new Promise((resolve, reject) => reader.readEntries(resolve, reject));
    if (!batch.length) return;
    for (const child of batch) await readEntry(child, prefix, files);
  }
}

async function readEntry(entry, prefix, files) {
  if (entry.isFile) {
    const file = await new Promise((resolve, reject) => entry.file(resolve, reject));
    files.push({ path: prefix + entry.name, bytes: new Uint8Array(await file.arrayBuffer()) });
    return;
  }
  await readDirectory(entry, `${prefix}${entry.name}/`, files);
}

function parseEnvironment(text) {
  const variables = {};
  for (const line of text.split("\n").map((each) => each.trim()).filter(Boolean)) {
    const equals = line.indexOf("=");
    if (equals <= 0) throw Object.assign(new Error(`Environment line ${JSON.stringify(line)} is not NAME=value.`), { code: "BadEnvironment" });
    variables[line.slice(0, equals)] = line.slice(equals + 1);
  }
  return variables;
}

// The code to upload: one zip's bytes, or the files of a folder zipped here.
async function packageSelection(selection) {
  if (selection.zip) return new Uint8Array(await selection.zip.arrayBuffer());
  const files = selection.files;
  if (!files.some((file) => file.path === "Dockerfile")) {
    throw Object.assign(new Error(`The folder has no Dockerfile at its top (it has ${files.length} files).`), { code: "NoDockerfile" });
  }
  return zipFiles(files);
}

export async function renderDeploy(view, _params, signal) {
  const managed = await listAll("ListManagedMicrovmImages", {}, { signal });
  let selection = null;
  const chosen = h("p", { class: "muted", "aria-live": "polite" }, "Nothing chosen yet.");
  const choose = (picked) => {
    selection = picked;
    chosen.textContent = picked.zip ? `Zip: ${picked.zip.name} (${picked.zip.size} bytes)` : `Folder: ${picked.files.length} files`;
  };
  const folderInput = h("input", { type: "file", webkitdirectory: true, multiple: true, name: "folder", "aria-label": "Folder with a Dockerfile" });
  folderInput.addEventListener("change", async () => {
    const files = [];
    for (const file of folderInput.files) files.push({ path: withoutTopFolder(file.webkitRelativePath || file.name), bytes: new Uint8Array(await file.arrayBuffer()) });
    choose({ files });
  });
  const zipInput = h("input", { type: "file", accept: ".zip,application/zip", name: "zip", "aria-label": "Zip with a Dockerfile" });
  zipInput.addEventListener("change", () => zipInput.files[0] && choose({ zip: zipInput.files[0] }));
  const drop = h("div", { class: "drop" }, "Drop a folder with a Dockerfile, or its zip, here");
  drop.addEventListener("dragover", (event) => { event.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", async (event) => {
    event.preventDefault();
    drop.classList.remove("over");
    const item = event.dataTransfer.items[0];
    const entry = item && item.webkitGetAsEntry && item.webkitGetAsEntry();
    if (entry && entry.isDirectory) {
      const files = [];
      await readDirectory(entry, "", files);
      choose({ files });
    } else if (event.dataTransfer.files[0]) choose({ zip: event.dataTransfer.files[0] });
  });

  const hookBoxes = (names, checked) => names.map((name) => h("label", {}, h("input", { type: "checkbox", name: `hook-${name}`, checked: checked.includes(name) }), name));
  const result = h("div", { "aria-live": "polite" });
  const form = h(
    "form",
    { class: "stack", "aria-label": "Deploy an image" },
    h("label", {}, "Image name", h("input", { name: "name", required: true, pattern: "[A-Za-z0-9][A-Za-z0-9_\\-]*", spellcheck: "false" })),
    h("fieldset", {}, h("legend", {}, "Code"), drop, h("p", {}, h("label", {}, "Folder ", folderInput), h("label", {}, "or zip ", zipInput)), chosen),
    h("label", {}, "Base image", h("select", { name: "baseImageArn" }, managed.map((image) => h("option", { value: image.imageArn }, image.imageArn)))),
    h("label", {}, "Build role ARN", h("input", { name: "buildRoleArn", value: DEFAULT_BUILD_ROLE })),
    h("label", {}, "App port (hooks and endpoint)", h("input", { name: "port", inputmode: "numeric", value: "8080" })),
    h("fieldset", {}, h("legend", {}, "Image hooks"), hookBoxes(IMAGE_HOOKS, ["ready"])),
    h("fieldset", {}, h("legend", {}, "MicroVM hooks"), hookBoxes(MICROVM_HOOKS, ["run"])),
    h("label", {}, "Minimum memory (MiB) ", h("span", { class: "hint" }, "(empty: the default)"), h("input", { name: "memory", inputmode: "numeric" })),
    h("label", {}, "Environment ", h("span", { class: "hint" }, "(one NAME=value a line)"), h("textarea", { name: "environment", rows: 3 })),
    h("label", {}, "Description", h("input", { name: "description" })),
    h("div", {}, h("button", { type: "submit", class: "primary" }, "Deploy")),
    result,
  );

  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    const data = new FormData(form);
    const submit = form.querySelector("button[type=submit]");
    const progress = (text) => replace(result, h("p", { class: "loading" }, h("span", { class: "spinner", "aria-hidden": "true" }), " ", text));
    submit.disabled = true;
    try {
      if (!selection) throw Object.assign(new Error("Choose a folder with a Dockerfile, or its zip, first."), { code: "NoCode" });
      progress("Zipping…");
      const archive = await packageSelection(selection);
      progress(`Uploading ${archive.length} bytes…`);
      const uploaded = await send("POST", `${location.origin}/_openmicrovm/artifacts`, { body: JSON.stringify({ zipFile: base64(archive) }), signal });
      const hookStates = (names) => Object.fromEntries(names.map((name) => [name, data.get(`hook-${name}`) ? "ENABLED" : "DISABLED"]));
      const environment = parseEnvironment(String(data.get("environment") || ""));
      const config = {
        codeArtifact: uploaded.codeArtifact,
        baseImageArn: data.get("baseImageArn"),
        buildRoleArn: data.get("buildRoleArn") || undefined,
        description: data.get("description") || undefined,
        hooks: { port: Number(data.get("port") || 8080), microvmImageHooks: hookStates(IMAGE_HOOKS), microvmHooks: hookStates(MICROVM_HOOKS) },
        resources: data.get("memory") ? [{ minimumMemoryInMiB: Number(data.get("memory")) }] : undefined,
        environmentVariables: Object.keys(environment).length ? environment : undefined,
      };
      const name = String(data.get("name")).trim();
      progress("Creating the image…");
      const existing = (await listAll("ListMicrovmImages", { nameFilter: name }, { signal })).find((image) => image.name === name);
      const answer = existing
        ? await call("UpdateMicrovmImage", { imageIdentifier: existing.imageArn, ...config }, { signal })
        : await call("CreateMicrovmImage", { name, ...config }, { signal });
      location.hash = `#/images/${encodeURIComponent(answer.imageArn)}`;
    } catch (error) {
      if (error.name !== "AbortError") replace(result, errorBox(error, "Deploy"));
    } finally {
      submit.disabled = false;
    }
  });

  replace(view, h("h1", {}, "Deploy an image"), form);
}
