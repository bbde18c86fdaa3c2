// Starts the herald binary on 127.0.0.1 with an ephemeral port, for the browser tests.
import { spawn } from 'node:child_process';
import { once } from 'node:events';
import { connect, createServer } from 'node:net';
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { dirname, join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';

import { chromium } from 'playwright-core';

export const REPO = resolve(dirname(fileURLToPath(import.meta.url)), '../..');
/** Where the tests leave their screenshots. */
export const OUTPUT = join(REPO, 'tests/browser/output');

/** Headless Debian Chromium ($CHROMIUM_BIN, else /usr/bin/chromium) through playwright-core. */
export async function launchChromium() {
  return chromium.launch({
    executablePath: process.env.CHROMIUM_BIN ?? '/usr/bin/chromium',
    args: [
      '--headless',
      '--no-sandbox',
      '--disable-gpu',
      '--disable-quic',
      '--no-first-run',
      '--disable-background-networking',
      '--disable-component-update',
      '--disable-sync',
    ],
  });
}

/**
 * A waiter with a timeout: `until(page, what, fn, arg)` resolves once `fn(arg)` is truthy in the
 * page, and otherwise fails naming `what`, with the page's log.
 */
export function waiter(timeoutMs) {
  return async function until(page, what, fn, arg) {
    try {
      await page.waitForFunction(fn, arg, { timeout: timeoutMs, polling: 50 });
    } catch (error) {
      const log = await page.locator('#log').innerText().catch(() => '');
      throw new Error(`timed out waiting for ${what}\npage log:\n${log}`, { cause: error });
    }
  };
}
const STARTUP_TIMEOUT_MS = 20_000;

/**
 * A Redis for a fleet of instances: `$REDIS_URL` when set, otherwise a private `redis-server`
 * on a free port. Resolves to `{url, stop()}`.
 */
export async function startRedis() {
  if (process.env.REDIS_URL) return { url: process.env.REDIS_URL, async stop() {} };
  const port = await new Promise((resolvePort, reject) => {
    const probe = createServer();
    probe.once('error', reject);
    probe.listen(0, '127.0.0.1', () => {
      const { port: free } = probe.address();
      probe.close(() => resolvePort(free));
    });
  });
  const child = spawn('redis-server', ['--port', String(port), '--bind', '127.0.0.1', '--save', '', '--appendonly', 'no'], {
    stdio: 'ignore',
  });
  child.once('error', (error) => {
    throw new Error(`redis-server is not on PATH and REDIS_URL is not set: ${error.message}`);
  });
  for (let i = 0; i < 200; i++) {
    const up = await new Promise((resolveUp) => {
      const socket = connect(port, '127.0.0.1', () => {
        socket.end();
        resolveUp(true);
      });
      socket.once('error', () => resolveUp(false));
    });
    if (up) break;
    await new Promise((r) => setTimeout(r, 50));
  }
  return {
    url: `redis://127.0.0.1:${port}`,
    async stop() {
      if (child.exitCode === null) {
        const exited = once(child, 'exit');
        child.kill('SIGTERM');
        await exited;
      }
    },
  };
}

/**
 * Spawns `$HERALD_BIN` (default target/debug/herald) with `PORT=0`, a fresh data dir and no
 * JWT secret, so it runs in dev mode, and resolves once it logs `listening addr=HOST:PORT`.
 * `env` adds or overrides variables; a value of `undefined` removes one.
 */
export async function startHerald({ instanceId = 'page-1', env = {}, dataDir } = {}) {
  const bin = process.env.HERALD_BIN ?? join(REPO, 'target/debug/herald');
  dataDir ??= await mkdtemp(join(tmpdir(), 'herald-browser-'));
  const childEnv = Object.fromEntries(
    Object.entries(process.env).filter(([k]) => !/^(HERALD_|JWT_SECRET$|PORT$|INSTANCE_ID$)/.test(k)),
  );
  Object.assign(childEnv, {
    PORT: '0',
    HERALD_HOST: '127.0.0.1',
    HERALD_DATA_DIR: dataDir,
    INSTANCE_ID: instanceId,
    RUST_LOG: process.env.RUST_LOG ?? 'info',
    NO_COLOR: '1',
  });
  for (const [k, v] of Object.entries(env)) {
    if (v === undefined) delete childEnv[k];
    else childEnv[k] = v;
  }

  const child = spawn(bin, [], { env: childEnv, stdio: ['ignore', 'ignore', 'pipe'] });
  const logs = [];
  const addr = await new Promise((resolveAddr, reject) => {
    let buffered = '';
    const timer = setTimeout(() => {
      child.kill('SIGKILL');
      reject(new Error(`herald did not log "listening addr=..." within ${STARTUP_TIMEOUT_MS} ms:\n${logs.join('\n')}`));
    }, STARTUP_TIMEOUT_MS);
    child.stderr.setEncoding('utf8');
    child.stderr.on('data', (chunk) => {
      buffered += chunk;
      let newline;
      while ((newline = buffered.indexOf('\n')) >= 0) {
        // eslint-disable-next-line no-control-regex
        const line = buffered.slice(0, newline).replace(/\x1b\[[0-9;]*m/g, '');
        buffered = buffered.slice(newline + 1);
        logs.push(line);
        const found = /\blistening\b/.test(line) && line.match(/addr=(\S+)/);
        if (found) {
          clearTimeout(timer);
          resolveAddr(found[1]);
        }
      }
    });
    child.once('error', (error) => {
      clearTimeout(timer);
      reject(new Error(`cannot start ${bin}: ${error.message} (build it with cargo build -p herald-server)`));
    });
    child.once('exit', (code, signal) => {
      clearTimeout(timer);
      reject(new Error(`herald exited before listening (code=${code} signal=${signal}):\n${logs.join('\n')}`));
    });
  });

  return {
    instanceId,
    url: `http://${addr}`,
    logs,
    async stop() {
      if (child.exitCode === null && child.signalCode === null) {
        const exited = once(child, 'exit');
        child.kill('SIGTERM');
        const timer = setTimeout(() => child.kill('SIGKILL'), 10_000);
        await exited;
        clearTimeout(timer);
      }
      await rm(dataDir, { recursive: true, force: true });
    },
  };
}
