// thaw's warm Node.js runner (docs/runner-protocol.md).
//
// Started as the template's START process before the snapshot. It waits on a
// Unix socket for exactly one job, then runs the code with the semantics of
// `node -e CODE ARGS...`: process.argv is [execPath, ...ARGS], `require`
// resolves from the working directory, an uncaught error prints its stack and
// exits 1, process.exit(n) sets the status, and the process ends when the
// event loop is empty.
'use strict';

const fs = require('fs');
const net = require('net');
const path = require('path');
const vm = require('vm');
const Module = require('module');
const crypto = require('crypto'); // eslint-disable-line no-unused-vars
const util = require('util'); // eslint-disable-line no-unused-vars

const SOCKET = process.env.THAW_RUNNER_SOCKET || '/run/thaw-runner/runner.sock';

try { fs.unlinkSync(SOCKET); } catch (_) { /* not there */ }

const server = net.createServer((conn) => {
  server.close();
  try { fs.unlinkSync(SOCKET); } catch (_) { /* already gone */ }
  let buf = '';
  conn.setEncoding('utf8');
  conn.on('data', (chunk) => {
    buf += chunk;
    const nl = buf.indexOf('\n');
    if (nl < 0) return;
    conn.removeAllListeners('data');
    const job = JSON.parse(buf.slice(0, nl));
    conn.end();
    conn.unref();
    run(job);
  });
});
server.listen(SOCKET);

function run(job) {
  Object.assign(process.env, job.env || {});
  if (job.cwd) process.chdir(job.cwd);
  process.argv = [process.execPath, ...(job.args || [])];
  const filename = path.join(process.cwd(), '[eval]');
  const mod = new Module(filename, null);
  mod.filename = filename;
  mod.paths = Module._nodeModulePaths(process.cwd());
  globalThis.module = mod;
  globalThis.exports = mod.exports;
  globalThis.require = Module.createRequire(filename);
  globalThis.__filename = '[eval]';
  globalThis.__dirname = '.';
  // Runs in this context, as `node -e` does; an uncaught error reaches
  // node's own handler: stack on stderr, exit status 1.
  vm.runInThisContext(job.code, { filename: '[eval]' });
}
