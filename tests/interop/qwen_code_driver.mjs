#!/usr/bin/env node
// Drives the credential code of the REAL Qwen Code CLI (npm package @qwen-code/qwen-code), for
// tests/test_qwen_code_interop.py. Nothing of Qwen Code is copied here: this script imports the
// installed package's own module (the esbuild chunk that holds packages/core/src/qwen/
// sharedTokenManager.ts and qwenOAuth2.ts) and calls its exported functions and its
// SharedTokenManager's methods.
//
//   QWEN_CODE_PACKAGE=<dir of the installed package> QWEN_HOME=<dir> node qwen_code_driver.mjs CMD
//
// Commands (every output line is one JSON object; no token value is ever printed, only a
// fingerprint: the first 16 hex digits of its SHA-256):
//   info        {"version", "module"}: the package version and the chunk that was imported.
//   read        Load oauth_creds.json as SharedTokenManager does before every API call (stat,
//               read, JSON.parse, validate) and say whether Qwen Code accepted it:
//               {"accepted", "valid" (not within 30 s of expiry), "fields", "token_type",
//                "resource_url", "expiry_date", "access", "refresh"}.
//   read-many   stdin: a JSON array of file contents (strings). Writes each to oauth_creds.json in
//               turn and loads it as `read` does: {"accepted": [bool, ...]}.
//   write       stdin: a JSON object. Writes it with Qwen Code's cacheQwenCredentials (what its
//               device-flow login does): {"written": true}.
//   lock [--attempts N] [--interval MS]
//               Take oauth_creds.lock with SharedTokenManager.acquireLock (its retry settings can be
//               shortened through its setLockConfig test hook), print {"locked": true}, hold it
//               until stdin closes, release it with releaseLock: {"released": true}.
//               {"locked": false, "error": "LOCK_TIMEOUT"} (exit 3) when it gave up.
//   get [--gate] What Qwen Code does before every API call: SharedTokenManager.getValidCredentials
//               (reload when the file changed; when expired: lock, re-read, refresh, write, unlock).
//               {"ok", "access", "refresh", "expiry_date", "resource_url", "fetches"} or
//               {"ok": false, "error_type", "error", "fetches"} (exit 4).
//
// Events printed while `get` and `lock` run: {"event": "lock-busy"} each time a lock attempt finds
// oauth_creds.lock taken; with --gate, {"event": "fetch"} when Qwen Code is about to send its
// refresh request (it holds the lock by then), after which it waits for a line on stdin.
//
// Network: Qwen Code's OAuth URL (https://chat.qwen.ai) is hard-coded and requested with the global
// fetch. This script wraps globalThis.fetch so those requests go to $QWEN_INTEROP_OAUTH_URL (the
// test suite's stand-in; trust its CA with NODE_EXTRA_CA_CERTS). Without that variable, any
// request fails. No other request is allowed.

import { createHash } from "node:crypto";
import { promises as fsp, readdirSync, readFileSync, writeFileSync } from "node:fs";
import path from "node:path";
import { createInterface } from "node:readline";
import { pathToFileURL } from "node:url";

const QWEN_OAUTH_BASE = "https://chat.qwen.ai";
const MARKER = "// packages/core/src/qwen/sharedTokenManager.ts";
const NEEDED = ["SharedTokenManager", "QwenOAuth2Client", "cacheQwenCredentials"];

function out(obj) {
  process.stdout.write(JSON.stringify(obj) + "\n");
}

function fail(message, code = 2) {
  out({ error: message });
  process.exit(code);
}

function fingerprint(token) {
  return typeof token === "string" ? createHash("sha256").update(token).digest("hex").slice(0, 16) : null;
}

function describe(creds) {
  return {
    access: fingerprint(creds.access_token),
    refresh: fingerprint(creds.refresh_token),
    token_type: creds.token_type ?? null,
    resource_url: creds.resource_url ?? null,
    expiry_date: creds.expiry_date ?? null,
    fields: Object.keys(creds),
  };
}

// --- finding Qwen Code's credential module in the installed package ------------------------------

// The files that may hold the module, likeliest first: $QWEN_CODE_MODULE (what `info` printed
// earlier), then the chunks that the lazily loaded qwenOAuth2-*.js entry imports, then every other
// .js file in chunks/ and at the top. Each candidate is checked, never trusted.
function candidates(pkgDir) {
  const files = [];
  if (process.env.QWEN_CODE_MODULE) files.push(path.resolve(pkgDir, process.env.QWEN_CODE_MODULE));
  for (const dir of [path.join(pkgDir, "chunks"), pkgDir]) {
    let names;
    try {
      names = readdirSync(dir).filter((n) => n.endsWith(".js")).sort();
    } catch {
      continue;
    }
    for (const entry of names.filter((n) => n.startsWith("qwenOAuth2-"))) {
      const text = readFileSync(path.join(dir, entry), "utf-8");
      for (const m of text.matchAll(/from "\.\/([^"]+\.js)"/g)) files.push(path.join(dir, m[1]));
    }
    files.push(...names.map((n) => path.join(dir, n)));
  }
  return [...new Set(files)];
}

async function loadQwenCode() {
  const pkgDir = process.env.QWEN_CODE_PACKAGE;
  if (!pkgDir) fail("QWEN_CODE_PACKAGE is not set");
  let pkg;
  try {
    pkg = JSON.parse(readFileSync(path.join(pkgDir, "package.json"), "utf-8"));
  } catch (e) {
    fail(`no package.json in ${pkgDir}: ${e.message}`);
  }
  if (pkg.name !== "@qwen-code/qwen-code") fail(`${pkgDir} holds ${pkg.name}, not @qwen-code/qwen-code`);
  for (const file of candidates(pkgDir)) {
    let text;
    try {
      text = readFileSync(file, "utf-8");
    } catch {
      continue;
    }
    if (!text.includes(MARKER)) continue;
    const mod = await import(pathToFileURL(file).href);
    if (NEEDED.every((n) => typeof mod[n] === "function")) {
      return { mod, version: pkg.version, module: path.relative(pkgDir, file) };
    }
  }
  fail(
    `no module in ${pkgDir} exports ${NEEDED.join(", ")} (looked for "${MARKER}" in chunks/*.js ` +
      "and *.js): this Qwen Code version is bundled differently; adapt tests/interop/qwen_code_driver.mjs",
  );
}

// --- instrumentation: the network, and lock attempts ---------------------------------------------

let fetches = 0;
let gate = false;
let lines = null; // async iterator over stdin lines, created on first use

async function nextLine() {
  lines ??= createInterface({ input: process.stdin })[Symbol.asyncIterator]();
  const { done } = await lines.next();
  return !done;
}

const realFetch = globalThis.fetch;
globalThis.fetch = async (input, init) => {
  const url = typeof input === "string" ? input : input instanceof URL ? input.href : input.url;
  const target = process.env.QWEN_INTEROP_OAUTH_URL;
  if (!url.startsWith(QWEN_OAUTH_BASE + "/") || !target) {
    throw new Error(`network disabled in this test: ${url}`);
  }
  fetches += 1;
  if (gate) {
    out({ event: "fetch" });
    await nextLine();
  }
  return realFetch(target.replace(/\/$/, "") + url.slice(QWEN_OAUTH_BASE.length), init);
};

function watchLockAttempts(lockPath) {
  // SharedTokenManager.acquireLock creates the lock with fs.promises.writeFile(path, id, {flag:"wx"}).
  const realWriteFile = fsp.writeFile;
  fsp.writeFile = async function (file, data, options) {
    try {
      return await realWriteFile.call(this, file, data, options);
    } catch (e) {
      if (file === lockPath && e?.code === "EEXIST") out({ event: "lock-busy" });
      throw e;
    }
  };
}

// --- commands -------------------------------------------------------------------------------------

async function readAsQwenCode(manager, client) {
  // The file-check step of getValidCredentials: stat, and when the mtime moved, read, JSON.parse and
  // validate; an invalid file leaves no credentials. clearCache() forgets what an earlier call saw.
  manager.clearCache();
  await manager.checkAndReloadIfNeeded(client);
  return manager.getCurrentCredentials();
}

async function main() {
  const [cmd, ...args] = process.argv.slice(2);
  if (!process.env.QWEN_HOME) fail("QWEN_HOME is not set: refusing to touch ~/.qwen");
  const { mod, version, module } = await loadQwenCode();
  const { SharedTokenManager, QwenOAuth2Client, cacheQwenCredentials } = mod;
  const manager = SharedTokenManager.getInstance();
  const credPath = manager.getCredentialFilePath();
  const lockPath = manager.getLockFilePath();
  if (path.dirname(credPath) !== path.resolve(process.env.QWEN_HOME)) {
    fail(`Qwen Code resolved its directory to ${path.dirname(credPath)}, not QWEN_HOME`);
  }
  const option = (name, dflt) => {
    const i = args.indexOf(name);
    return i >= 0 ? Number(args[i + 1]) : dflt;
  };

  switch (cmd) {
    case "info":
      out({ version, module, credentials: credPath, lock: lockPath });
      return 0;

    case "read": {
      const creds = await readAsQwenCode(manager, new QwenOAuth2Client());
      if (!creds) {
        out({ accepted: false });
        return 0;
      }
      out({ accepted: true, valid: manager.isTokenValid(creds), ...describe(creds) });
      return 0;
    }

    case "read-many": {
      const contents = JSON.parse(readFileSync(0, "utf-8"));
      const accepted = [];
      for (const content of contents) {
        writeFileSync(credPath, content, { mode: 0o600 });
        accepted.push((await readAsQwenCode(manager, new QwenOAuth2Client())) !== null);
      }
      out({ accepted });
      return 0;
    }

    case "write": {
      const creds = JSON.parse(readFileSync(0, "utf-8"));
      await cacheQwenCredentials(creds);
      out({ written: true });
      return 0;
    }

    case "lock": {
      manager.setLockConfig({
        maxAttempts: option("--attempts", 20),
        attemptInterval: option("--interval", 100),
      });
      watchLockAttempts(lockPath);
      try {
        await manager.acquireLock(lockPath);
      } catch (e) {
        out({ locked: false, error: e.type ?? String(e) });
        return 3;
      }
      out({ locked: true });
      while (await nextLine()); // hold until stdin closes
      await manager.releaseLock(lockPath);
      out({ released: true });
      return 0;
    }

    case "get": {
      gate = args.includes("--gate");
      watchLockAttempts(lockPath);
      const client = new QwenOAuth2Client();
      try {
        const creds = await manager.getValidCredentials(client);
        out({ ok: true, ...describe(creds), fetches });
        return 0;
      } catch (e) {
        out({ ok: false, error_type: e.type ?? null, error: String(e.message ?? e), fetches });
        return 4;
      }
    }

    default:
      fail(`unknown command ${cmd}; see the comment at the top of ${process.argv[1]}`);
  }
}

process.exitCode = await main();
// Qwen Code registered exit/SIGINT/SIGTERM handlers; leave promptly once done.
process.exit();
