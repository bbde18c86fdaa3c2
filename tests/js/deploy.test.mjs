// The container deployment, checked without Docker: deploy/docker-compose.yml is parsed, every
// herald service's environment is run through `herald check-config --strict` (so that every
// name is a herald setting and every value parses), and the ports, hostnames and credentials
// that the services share (nginx upstreams, REDIS_URL, DATABASE_URL) must agree with each other
// and with deploy/nginx.conf and deploy/Dockerfile.

import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import { readFileSync } from 'node:fs';
import path from 'node:path';
import { describe, test } from 'node:test';
import { parse } from 'yaml';

import { HERALD_BIN, REPO_ROOT } from './harness.mjs';

const DEPLOY = path.join(REPO_ROOT, 'deploy');
const compose = parse(readFileSync(path.join(DEPLOY, 'docker-compose.yml'), 'utf8'), { merge: true });
const nginxConf = readFileSync(path.join(DEPLOY, 'nginx.conf'), 'utf8');
const dockerfile = readFileSync(path.join(DEPLOY, 'Dockerfile'), 'utf8');
const services = compose.services;
const heraldServices = Object.keys(services).filter((name) => /^herald-\d+$/.test(name));

/** Compose's `${VAR:?msg}` / `${VAR:-default}` interpolation, with `given` as the shell. */
function interpolate(value, given) {
  return String(value).replace(/\$\{(\w+)(?::([?-])([^}]*))?\}/g, (_, name, op, arg) => {
    if (given[name] !== undefined && given[name] !== '') return given[name];
    if (op === '?') throw new Error(`${name} is required: ${arg}`);
    return op === '-' ? arg : '';
  });
}

function environment(service, given = { JWT_SECRET: 'compose-test-secret-0123456789' }) {
  const env = {};
  for (const [k, v] of Object.entries(services[service].environment ?? {})) env[k] = interpolate(v, given);
  return env;
}

function checkConfig(env, args = []) {
  // Only what compose gives the container (plus PATH), as in the container.
  const run = spawnSync(HERALD_BIN, ['check-config', '--strict', ...args], {
    env: { PATH: process.env.PATH, ...env },
    encoding: 'utf8',
  });
  return run;
}

/** The `server host:port` lines between the herald:servers markers of each upstream. */
function upstreamServers(conf) {
  const blocks = [...conf.matchAll(/# herald:servers:begin\n([\s\S]*?)# herald:servers:end/g)];
  return blocks.map((b) => [...b[1].matchAll(/server\s+([\w.-]+):(\d+)/g)].map((m) => `${m[1]}:${m[2]}`));
}

describe('deploy/docker-compose.yml', () => {
  test('has 3 instances, a worker, Redis, PostgreSQL and nginx on :8080', () => {
    assert.deepEqual(heraldServices.sort(), ['herald-1', 'herald-2', 'herald-3']);
    for (const name of ['worker', 'redis', 'postgres', 'nginx']) assert.ok(services[name], `service ${name}`);
    assert.deepEqual(services.nginx.ports, ['8080:8080']);
    assert.deepEqual(services.worker.command, ['worker']);
    assert.ok(services.redis.command.includes('--appendonly'), 'Redis keeps an AOF');
    const aof = services.redis.command.indexOf('--appendonly');
    assert.equal(services.redis.command[aof + 1], 'yes');
  });

  test('every herald service environment is a valid herald configuration', () => {
    for (const name of [...heraldServices, 'worker']) {
      const env = environment(name);
      const run = checkConfig(env);
      assert.equal(run.status, 0, `${name}: herald check-config --strict failed:\n${run.stderr}`);
      assert.match(run.stdout, new RegExp(`instance_id = "${env.INSTANCE_ID}"`), name);
      assert.match(run.stdout, /worker = false/, `${name}: instances leave storing to the worker service`);
    }
    // The instance ids are distinct, so presence and metrics tell instances apart.
    const ids = [...heraldServices, 'worker'].map((n) => environment(n).INSTANCE_ID);
    assert.equal(new Set(ids).size, ids.length);
  });

  test('a typo in a herald setting is caught by the same check', () => {
    const env = { ...environment('herald-1'), HERALD_SHUTDOWN_TIMOUT: '5s' };
    const run = checkConfig(env);
    assert.notEqual(run.status, 0);
    assert.match(run.stderr, /HERALD_SHUTDOWN_TIMOUT/);
  });

  test('JWT_SECRET must be given: the fleet shares one secret', () => {
    assert.throws(() => environment('herald-1', {}), /JWT_SECRET is required/);
  });

  test('REDIS_URL and DATABASE_URL point at the redis and postgres services', () => {
    const pg = services.postgres.environment;
    for (const name of [...heraldServices, 'worker']) {
      const env = environment(name);
      const redis = new URL(env.REDIS_URL);
      assert.equal(redis.hostname, 'redis');
      assert.equal(redis.port, '6379');
      const db = new URL(env.DATABASE_URL);
      assert.equal(db.hostname, 'postgres');
      assert.equal(db.port, '5432');
      assert.equal(db.username, pg.POSTGRES_USER);
      assert.equal(db.password, pg.POSTGRES_PASSWORD);
      assert.equal(db.pathname, `/${pg.POSTGRES_DB}`);
      const deps = services[name].depends_on;
      assert.equal(deps.redis.condition, 'service_healthy');
      assert.equal(deps.postgres.condition, 'service_healthy');
    }
  });

  test('nginx mounts deploy/nginx.conf, whose upstreams are exactly the herald services', () => {
    assert.ok(services.nginx.volumes.includes('./nginx.conf:/etc/nginx/nginx.conf:ro'));
    const expected = heraldServices.map((n) => `${n}:${environment(n).PORT}`).sort();
    const upstreams = upstreamServers(nginxConf);
    assert.equal(upstreams.length, 2, 'a sticky and a spread upstream');
    for (const servers of upstreams) assert.deepEqual([...servers].sort(), expected);
    assert.match(nginxConf, /listen 8080[ ;]/);
    for (const name of heraldServices) assert.equal(services.nginx.depends_on[name].condition, 'service_healthy');
  });

  test('the health check and the image use real herald commands', () => {
    assert.deepEqual(services['herald-1'].healthcheck.test, ['CMD', 'herald', 'health']);
    const help = spawnSync(HERALD_BIN, ['health', '--help'], { encoding: 'utf8' });
    assert.equal(help.status, 0, help.stderr);
    assert.match(help.stdout, /--path/);
    // Outlives the drain.
    const grace = Number.parseInt(services['herald-1'].stop_grace_period, 10);
    const drain = Number.parseInt(environment('herald-1').HERALD_SHUTDOWN_TIMEOUT, 10);
    assert.ok(grace > drain, `stop_grace_period ${grace}s must exceed HERALD_SHUTDOWN_TIMEOUT ${drain}s`);
  });
});

describe('deploy/Dockerfile', () => {
  test('is multi-stage, runs as a non-root user and exposes the configured port', () => {
    const froms = dockerfile.match(/^FROM\s/gm) ?? [];
    assert.ok(froms.length >= 2, 'a build stage and a runtime stage');
    assert.match(dockerfile, /^FROM debian:\S+-slim AS runtime$/m);
    const users = [...dockerfile.matchAll(/^USER\s+(\S+)/gm)].map((m) => m[1]);
    assert.ok(users.length > 0 && !['root', '0'].includes(users.at(-1)), 'the last USER is not root');
    assert.match(dockerfile, /^EXPOSE 3000$/m);
    assert.match(dockerfile, /PORT=3000/);
    assert.match(dockerfile, /^ENTRYPOINT \["herald"\]$/m);
    assert.match(dockerfile, /cargo build --release --locked -p herald-server/);
    // The build context must include what the binary embeds.
    const ignored = readFileSync(path.join(REPO_ROOT, '.dockerignore'), 'utf8').split('\n');
    for (const needed of ['web', 'crates', 'Cargo.lock']) assert.ok(!ignored.includes(needed), needed);
  });
});
