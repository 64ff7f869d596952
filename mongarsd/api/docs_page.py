"""The /docs page: one self-contained HTML file that renders /openapi.json in the browser.

No CDN, no fonts, no images: it must work on a board with no Internet access. The script builds
the page with DOM calls and textContent only (nothing from the document is parsed as HTML).
"""

from __future__ import annotations

from typing import Final

DOCS_HTML: Final = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>mongarsd API</title>
<style>
body{font:15px/1.45 system-ui,-apple-system,"Segoe UI",sans-serif;margin:0;color:#1d2330;background:#f6f7f9}
header{background:#1d2330;color:#fff;padding:14px 24px}
header h1{margin:0;font-size:20px}
header p{margin:4px 0 0;opacity:.85}
main{max-width:1100px;margin:0 auto;padding:12px 24px 40px}
nav a{margin-right:14px;text-transform:capitalize}
h2{margin:26px 0 4px;text-transform:capitalize}
.tagdesc{color:#555;margin:0 0 8px}
details{background:#fff;border:1px solid #dde1e7;border-radius:6px;margin:6px 0}
summary{cursor:pointer;padding:7px 12px;display:flex;gap:10px;align-items:baseline;flex-wrap:wrap}
.m{font:600 12px ui-monospace,monospace;padding:2px 6px;border-radius:4px;color:#fff;min-width:52px;text-align:center;text-transform:uppercase}
.get{background:#2f7dd1}.post{background:#2a9d62}.put{background:#c98a12}.delete{background:#c4453c}.patch{background:#7a55c7}
.path,code,td.f{font-family:ui-monospace,SFMono-Regular,Menlo,monospace}
.path{font-weight:600}
.role{font-size:12px;color:#667;margin-left:auto}
.body{padding:2px 14px 12px}
h4{margin:12px 0 2px;font-size:14px}
table{border-collapse:collapse;width:100%;margin:4px 0}
th,td{text-align:left;border-bottom:1px solid #eceff3;padding:4px 8px;vertical-align:top;font-size:13.5px}
th{background:#f1f3f6;font-weight:600}
td.f{white-space:nowrap}
.req{color:#c4453c;font-weight:600}
.muted{color:#667}
#filter{width:100%;padding:8px 10px;font-size:15px;margin:10px 0;box-sizing:border-box;border:1px solid #cfd5dd;border-radius:6px}
</style>
</head>
<body>
<header><h1>mongarsd API</h1><p id="info">Loading openapi.json&hellip;</p></header>
<main>
<input id="filter" type="search" placeholder="Filter by method, path or summary" aria-label="Filter operations">
<nav id="nav"></nav>
<div id="ops"></div>
<p class="muted" id="auth"></p>
<p class="muted">Machine-readable: <a href="openapi.json">openapi.json</a> (OpenAPI 3.1).</p>
</main>
<script>
"use strict";
const METHODS = ["get", "post", "put", "delete", "patch"];
function el(tag, cls, ...kids) {
  const e = document.createElement(tag);
  if (cls) e.className = cls;
  for (const k of kids) if (k !== null && k !== undefined) e.append(k);
  return e;
}
function typeParts(s) {
  if (!s || typeof s !== "object") return ["any"];
  if ("const" in s) return [JSON.stringify(s.const)];
  if (s.title && (s.anyOf || s.properties)) return [s.title];
  if (s.enum) return s.enum.map(v => JSON.stringify(v));
  const alts = s.anyOf || s.oneOf;
  if (alts) return alts.flatMap(typeParts);
  const types = [].concat(s.type || []);
  if (!types.length) return [s.title || "any"];
  return types.map(t => {
    if (t === "array" && s.items) {
      const item = typeOf(s.items);
      return (item.includes(" | ") ? "(" + item + ")" : item) + "[]";
    }
    return t === "object" && s.title ? s.title : t;
  });
}
function typeOf(s) {
  return [...new Set(typeParts(s))].join(" | ");
}
function notes(s) {
  const out = [];
  if (s.description) out.push(s.description);
  const lim = [["minimum", "min"], ["maximum", "max"], ["minLength", "min length"], ["maxLength", "max length"],
    ["minItems", "min items"], ["maxItems", "max items"], ["pattern", "pattern"], ["default", "default"]];
  for (const [k, label] of lim) if (k in s) out.push(label + " " + JSON.stringify(s[k]));
  return out.join("; ");
}
function objectOf(s) {
  if (!s || typeof s !== "object") return null;
  if (s.items) return objectOf(s.items);
  if (s.properties) return s;
  const alts = (s.anyOf || []).filter(a => a && a.properties);
  if (!alts.length) return null;
  // the variants of a union (e.g. chat messages by role): every field of any, required in all
  const merged = {properties: {}, required: alts[0].required || []};
  for (const a of alts) {
    for (const [k, v] of Object.entries(a.properties)) {
      const seen = merged.properties[k];
      if (!seen) merged.properties[k] = v;
      else if (JSON.stringify(seen) !== JSON.stringify(v)) merged.properties[k] = {anyOf: [...(seen.variants || [seen]), v], variants: [...(seen.variants || [seen]), v]};
    }
    merged.required = merged.required.filter(k => (a.required || []).includes(k));
  }
  return merged;
}
function fieldRows(schema, prefix, depth, rows) {
  const required = new Set(schema.required || []);
  for (const [name, prop] of Object.entries(schema.properties || {})) {
    const key = prefix + name;
    rows.push([key, typeOf(prop), required.has(name), notes(prop)]);
    const inner = objectOf(prop);
    if (inner && depth < 2) fieldRows(inner, key + (prop.items || (prop.anyOf || []).some(a => a.items) ? "[]." : "."), depth + 1, rows);
  }
  return rows;
}
function table(head, rows) {
  const t = el("table");
  const tr = el("tr");
  for (const h of head) tr.append(el("th", null, h));
  t.append(tr);
  for (const r of rows) {
    const row = el("tr");
    r.forEach((c, i) => {
      const td = el("td", i === 0 ? "f" : null);
      if (c === true) td.append(el("span", "req", "required")); else if (c !== false) td.append(String(c));
      row.append(td);
    });
    t.append(row);
  }
  return t;
}
function operation(path, method, op) {
  const d = el("details");
  d.dataset.text = (method + " " + path + " " + (op.summary || "")).toLowerCase();
  d.append(el("summary", null, el("span", "m " + method, method), el("span", "path", path),
    el("span", null, op.summary || ""), el("span", "role", op["x-mongarsd-role"] || "")));
  const body = el("div", "body");
  if (op.description) body.append(el("p", null, op.description));
  if (op["x-mongarsd-stream"]) body.append(el("p", "muted", "Streams " + (op["x-mongarsd-stream"] === "sse" ? "server-sent events (text/event-stream)" : "NDJSON (application/x-ndjson)") + " when the request asks for a stream."));
  const params = op.parameters || [];
  if (params.length) {
    body.append(el("h4", null, "Parameters"));
    body.append(table(["Name", "In", "Type", "Required", "Notes"], params.map(p => [p.name, p.in, typeOf(p.schema), !!p.required, notes(p.schema || {}) + (p.description ? " " + p.description : "")])));
  }
  const rb = op.requestBody && op.requestBody.content && op.requestBody.content["application/json"];
  if (rb && rb.schema) {
    body.append(el("h4", null, "Request body (application/json)"));
    const rows = fieldRows(rb.schema, "", 0, []);
    body.append(rows.length ? table(["Field", "Type", "Required", "Notes"], rows) : el("p", "muted", typeOf(rb.schema)));
  }
  body.append(el("h4", null, "Responses"));
  const rrows = Object.entries(op.responses || {}).map(([code, r]) => {
    const content = r.content || {};
    const shapes = Object.entries(content).map(([media, m]) => {
      const s = m.schema || {};
      const fields = s.properties ? " {" + Object.keys(s.properties).join(", ") + "}" : "";
      return media + fields;
    });
    return [code, r.description || "", shapes.join("; ")];
  });
  body.append(table(["Status", "Description", "Content"], rrows));
  d.append(body);
  return d;
}
function render(doc) {
  const info = doc.info || {};
  document.getElementById("info").textContent = (info.title || "API") + " " + (info.version || "") + " \\u2014 " + (info.description || "");
  const scheme = ((doc.components || {}).securitySchemes || {}).bearer;
  if (scheme) document.getElementById("auth").textContent = "Authentication: " + scheme.description;
  const groups = new Map((doc.tags || []).map(t => [t.name, {desc: t.description, ops: []}]));
  for (const [path, item] of Object.entries(doc.paths || {})) {
    for (const method of METHODS) {
      const op = item[method];
      if (!op) continue;
      const tag = (op.tags || ["other"])[0];
      if (!groups.has(tag)) groups.set(tag, {desc: "", ops: []});
      groups.get(tag).ops.push([path, method, op]);
    }
  }
  const nav = document.getElementById("nav"), ops = document.getElementById("ops");
  for (const [name, g] of groups) {
    if (!g.ops.length) continue;
    const a = el("a", null, name);
    a.href = "#tag-" + name;
    nav.append(a);
    const section = el("section");
    section.id = "tag-" + name;
    section.append(el("h2", null, name), el("p", "tagdesc", g.desc || ""));
    for (const [path, method, op] of g.ops) section.append(operation(path, method, op));
    ops.append(section);
  }
  document.getElementById("filter").addEventListener("input", e => {
    const q = e.target.value.trim().toLowerCase();
    for (const d of ops.querySelectorAll("details")) d.style.display = !q || d.dataset.text.includes(q) ? "" : "none";
    for (const s of ops.querySelectorAll("section")) s.style.display = [...s.querySelectorAll("details")].some(d => d.style.display !== "none") ? "" : "none";
  });
}
fetch("openapi.json", {headers: {"Accept": "application/json"}})
  .then(r => { if (!r.ok) throw new Error("HTTP " + r.status); return r.json(); })
  .then(render)
  .catch(err => { document.getElementById("info").textContent = "Could not load openapi.json: " + err.message; });
</script>
</body>
</html>
"""
