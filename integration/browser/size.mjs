// Measures pushgate's browser client as a page would fetch it from a build
// that minifies: terser (compress and mangle), then gzip at level 9.
// Prints one JSON line: {"bytes", "minified", "gzipped"}.
import { readFileSync } from "node:fs";
import { gzipSync } from "node:zlib";
import { minify } from "terser";

const source = readFileSync(new URL("../../clients/js/pushgate.js", import.meta.url), "utf8");
const { code } = await minify(source, { module: true, ecma: 2020, compress: { passes: 2 }, mangle: true });
const gzipped = gzipSync(code, { level: 9 }).length;
console.log(JSON.stringify({ bytes: Buffer.byteLength(source), minified: Buffer.byteLength(code), gzipped }));
