// Starts scripts/cluster (3 herald instances, a worker, nginx, Redis, PostgreSQL) for a test and
// stops it afterwards. Uses $REDIS_URL / $DATABASE_URL when set (a fresh database is created on
// the latter); otherwise scripts/cluster starts private servers from PATH.

import assert from 'node:assert/strict';
import { spawn, spawnSync } from 'node:child_process';
import { existsSync, mkdtempSync, readdirSync, readFileSync, rmSync } from 'node:fs';
import net from 'node:net';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { after } from 'node:test';
import { setTimeout as sleep } from 'node:timers/promises';

import { HERALD_BIN, REPO_ROOT, rand } from './harness.mjs';

const CLUSTER = path.join(REPO_ROOT, 'scripts', 'cluster');
export const INSTANCES = 3;

function portFree(port) {
  return new Promise((resolve) => {
    const server = net.createServer();
    server.once('error', () => resolve(false));
    server.listen(port, '127.0.0.1', () => server.close(() => resolve(true)));
  });
}

/** A base port with `count` free consecutive ports after it. */
async function freePorts(count) {
  for (;;) {
    // Below the ephemeral range (32768+), so that no client's own port takes it meanwhile.
    const base = 20000 + Math.floor(Math.random() * 12000);
    let ok = true;
    for (let p = base; p < base + count && ok; p++) ok = await portFree(p);
    if (ok) return base;
  }
}

export function psql(url, sql) {
  const run = spawnSync('psql', [url, '-v', 'ON_ERROR_STOP=1', '-AtF', '|', '-c', sql], { encoding: 'utf8' });
  if (run.status !== 0) throw new Error(`psql failed: ${run.stderr}`);
  return run.stdout.trim();
}

/** A fresh database on $DATABASE_URL's server, so that tests never share rows; `drop()`
 * removes it once the cluster has stopped, so a shared server does not collect them. */
function freshDatabase(url) {
  const name = `herald_cluster_${rand(4)}`;
  psql(url, `CREATE DATABASE ${name}`);
  const fresh = new URL(url);
  fresh.pathname = `/${name}`;
  return { url: fresh.toString(), drop: () => psql(url, `DROP DATABASE IF EXISTS ${name}`) };
}

/** The last lines of every log under `dir`, for a failure message. */
function logTails(dir, lines = 15) {
  const out = [];
  const walk = (d) => {
    let entries = [];
    try {
      entries = readdirSync(d, { withFileTypes: true });
    } catch {
      return;
    }
    for (const e of entries) {
      const file = path.join(d, e.name);
      if (e.isDirectory() && e.name !== 'postgres' && e.name !== 'redis') walk(file);
      else if (e.isFile() && e.name.endsWith('.log')) {
        const tail = readFileSync(file, 'utf8').trimEnd().split('\n').slice(-lines).join('\n');
        out.push(`--- ${path.relative(dir, file)}\n${tail}`);
      }
    }
  };
  walk(dir);
  return out.join('\n');
}

const clusters = new Set();
after(async () => {
  await Promise.allSettled([...clusters].map((c) => c.stop()));
});

/**
 * Starts a fleet. `devMode` leaves JWT_SECRET unset, so that the instances share a generated
 * development secret and the page can mint tokens.
 */
export async function startCluster({ restart = false, devMode = false } = {}) {
  const dir = mkdtempSync(path.join(tmpdir(), 'herald-cluster-'));
  const port = await freePorts(1);
  const basePort = await freePorts(INSTANCES);
  const secret = rand(24);
  const apiKey = `key-${rand(16)}`;
  const env = {};
  for (const [k, v] of Object.entries(process.env)) {
    if (k.startsWith('HERALD_') || k.startsWith('JWT_') || k === 'DATABASE_URL' || k === 'POSTGRES_URL') continue;
    env[k] = v;
  }
  Object.assign(env, {
    HERALD_BIN,
    HERALD_API_KEY: apiKey,
    HERALD_PRESENCE_TTL: '3s',
    HERALD_SHUTDOWN_TIMEOUT: '10s',
    // Small batches, so that a drain of a dozen clients takes several waves.
    // Every client connects from 127.0.0.1, through nginx or not.
    HERALD_IP_CONNECT_RATE: '0',
    HERALD_DRAIN_BATCH: '3',
    HERALD_DRAIN_INTERVAL: '200ms',
    BATCH_TIMEOUT: '200ms',
    RUST_LOG: 'info',
    NO_COLOR: '1',
  });
  if (!devMode) env.JWT_SECRET = secret;
  if (process.env.REDIS_URL) env.HERALD_REDIS_KEY = `cluster-${rand(4)}`;
  const database = process.env.DATABASE_URL ?? process.env.POSTGRES_URL;
  const fresh = database ? freshDatabase(database) : null;
  if (fresh) env.DATABASE_URL = fresh.url;

  const args = ['--instances', String(INSTANCES), '--port', String(port), '--base-port', String(basePort), '--dir', dir];
  if (restart) args.push('--restart');
  const proc = spawn(CLUSTER, args, { env, stdio: ['ignore', 'pipe', 'pipe'], detached: true });
  const output = [];
  proc.stdout.on('data', (d) => output.push(String(d)));
  proc.stderr.on('data', (d) => output.push(String(d)));
  const exited = new Promise((resolve) => proc.once('exit', (code, signal) => resolve({ code, signal })));

  const cluster = {
    url: `http://127.0.0.1:${port}`,
    dir,
    secret,
    apiKey,
    proc,
    instancePort: (i) => basePort + i - 1,
    pid: (i) => Number.parseInt(readFileSync(path.join(dir, `herald-${i}.pid`), 'utf8'), 10),
    databaseUrl: () => readFileSync(path.join(dir, 'database_url'), 'utf8').trim(),
    log: () => `${output.join('')}\n${logTails(dir)}`,
    async stop() {
      clusters.delete(cluster);
      if (proc.exitCode === null && proc.signalCode === null) {
        proc.kill('SIGINT');
        const timer = setTimeout(() => {
          try {
            process.kill(-proc.pid, 'SIGKILL');
          } catch {
            // already gone
          }
        }, 30_000);
        await exited;
        clearTimeout(timer);
      }
      try {
        fresh?.drop();
      } catch {
        // still in use by a straggler: left for the server's owner
      }
      rmSync(dir, { recursive: true, force: true });
    },
  };
  clusters.add(cluster);

  const deadline = Date.now() + 180_000;
  while (!existsSync(path.join(dir, 'ready'))) {
    if (proc.exitCode !== null) throw new Error(`scripts/cluster exited early:\n${cluster.log()}`);
    if (Date.now() > deadline) throw new Error(`the cluster is not ready after 180 s:\n${cluster.log()}`);
    await sleep(200);
  }
  return cluster;
}

export async function api(cluster, route) {
  const res = await fetch(`${cluster.url}${route}`, { headers: { authorization: `Bearer ${cluster.apiKey}` } });
  assert.equal(res.status, 200, `${route}: ${res.status}`);
  return res.json();
}

export async function waitUntil(what, predicate, timeoutMs) {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const value = await predicate();
    if (value) return value;
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await sleep(200);
  }
}

