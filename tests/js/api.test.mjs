// HTTP API: POST /api/publish (message variant with default and explicit
// `from`, namespaces; custom event to a room or to every socket of a user),
// bearer-key checks (401), malformed JSON (400), GET presence and history
// endpoints, and the /health, /ready and /metrics endpoints.

import assert from 'node:assert/strict';
import { before, describe, test } from 'node:test';
import {
  MESSAGE_FIELDS,
  assertAck,
  barrier,
  collect,
  emitAck,
  http,
  join,
  openClient,
  publish,
  roomName,
  roomPath,
  startHerald,
  waitFor,
} from './harness.mjs';

describe('HTTP API', { timeout: 60_000 }, () => {
  let server;
  before(async () => {
    server = await startHerald();
  });

  const post = (body, opts = {}) => http(server, 'POST', '/api/publish', { body, ...opts });

  describe('POST /api/publish (message)', () => {
    test('members get a message event exactly as if a client had published; from defaults to "api"', async () => {
      const room = roomName('api');
      const a = await openClient(server, { sub: 'api-a' });
      const b = await openClient(server, { sub: 'api-b' });
      await join(a.socket, room);
      await join(b.socket, room);
      const atA = waitFor(a.socket, 'message', 5000, (m) => m.room === room);
      const atB = waitFor(b.socket, 'message', 5000, (m) => m.room === room);

      const before = Date.now();
      const res = await post({ room, data: { text: 'from the backend' } });
      assert.equal(res.status, 200, res.text);
      assert.equal(res.json.ok, true);
      assert.equal(res.json.offset, 1);
      assert.equal(typeof res.json.id, 'string');

      for (const m of [await atA, await atB]) {
        assert.deepEqual(Object.keys(m).sort(), MESSAGE_FIELDS);
        assert.equal(m.room, room);
        assert.equal(m.id, res.json.id);
        assert.equal(m.offset, 1);
        assert.equal(m.from, 'api');
        assert.deepEqual(m.data, { text: 'from the backend' });
        assert.ok(m.ts >= before - 1000 && m.ts <= Date.now() + 1000);
      }
    });

    test('explicit from, and offsets shared with socket publishers', async () => {
      const room = roomName('api-from');
      const a = await openClient(server, { sub: 'api-c' });
      await join(a.socket, room);
      const got = collect(a.socket, 'message', (m) => m.room === room);
      const first = await publish(a.socket, room, 'by socket');
      const res = await post({ room, data: 'by bot', from: 'billing-bot' });
      assert.equal(res.status, 200, res.text);
      assert.equal(res.json.offset, first.offset + 1);
      await got.until(2);
      assert.deepEqual(
        got.items.map((m) => [m.offset, m.from, m.data]),
        [
          [1, 'api-c', 'by socket'],
          [2, 'billing-bot', 'by bot'],
        ],
      );
    });

    test('namespace selects the room space', async () => {
      const room = roomName('api-ns');
      const root = await openClient(server, { sub: 'ns-root' });
      const ev = await openClient(server, { sub: 'ns-events', ns: '/events' });
      await join(root.socket, room);
      await join(ev.socket, room);
      const atRoot = collect(root.socket, 'message', (m) => m.room === room);
      const atEv = collect(ev.socket, 'message', (m) => m.room === room);

      const r1 = await post({ room, data: 'to events', namespace: '/events' });
      assert.equal(r1.status, 200, r1.text);
      assert.equal(r1.json.offset, 1);
      const r2 = await post({ room, data: 'to root' });
      assert.equal(r2.status, 200, r2.text);
      assert.equal(r2.json.offset, 1, 'independent offsets per namespace');

      await atEv.until(1);
      await atRoot.until(1);
      await barrier(root.socket, room);
      await barrier(ev.socket, room);
      assert.deepEqual(
        atEv.items.filter((m) => !m.data?.barrier).map((m) => m.data),
        ['to events'],
      );
      assert.deepEqual(
        atRoot.items.filter((m) => !m.data?.barrier).map((m) => m.data),
        ['to root'],
      );
    });

    test('API messages show up in history', async () => {
      const room = roomName('api-hist');
      for (let i = 1; i <= 3; i++) assert.equal((await post({ room, data: i })).status, 200);
      const res = await http(server, 'GET', roomPath(room, 'history'));
      assert.equal(res.status, 200, res.text);
      assert.equal(res.json.room, room);
      assert.deepEqual(
        res.json.messages.map((m) => [m.offset, m.from, m.data]),
        [
          [1, 'api', 1],
          [2, 'api', 2],
          [3, 'api', 3],
        ],
      );
    });
  });

  describe('POST /api/publish (custom event)', () => {
    test('{room, event, data}: members receive the named event, others do not', async () => {
      const room = roomName('api-ev');
      const member = await openClient(server, { sub: 'ev-member' });
      const outsider = await openClient(server, { sub: 'ev-outsider' });
      await join(member.socket, room);
      const got = waitFor(member.socket, 'order.shipped');
      const outsiderGot = collect(outsider.socket, 'order.shipped');

      const res = await post({ room, event: 'order.shipped', data: { order: 42, items: ['a', 'b'] } });
      assert.equal(res.status, 200, res.text);
      assertAck(res.json, { ok: true });
      assert.deepEqual(await got, { order: 42, items: ['a', 'b'] });

      // Sync the outsider through its personal room before checking absence.
      const sync = waitFor(outsider.socket, 'order.shipped');
      await post({ room: 'user:ev-outsider', event: 'order.shipped', data: 'sync' });
      assert.equal(await sync, 'sync');
      assert.deepEqual(outsiderGot.items, ['sync']);
    });

    test('{user, event, data}: every socket of that user receives it, nobody else', async () => {
      const tab1 = await openClient(server, { sub: 'kate' });
      const tab2 = await openClient(server, { sub: 'kate' });
      const other = await openClient(server, { sub: 'not-kate' });
      const otherGot = collect(other.socket, 'notify');
      const got1 = waitFor(tab1.socket, 'notify');
      const got2 = waitFor(tab2.socket, 'notify');

      const res = await post({ user: 'kate', event: 'notify', data: { unread: 3 } });
      assert.equal(res.status, 200, res.text);
      assertAck(res.json, { ok: true });
      assert.deepEqual(await got1, { unread: 3 });
      assert.deepEqual(await got2, { unread: 3 });

      const sync = waitFor(other.socket, 'notify');
      await post({ user: 'not-kate', event: 'notify', data: 'sync' });
      assert.equal(await sync, 'sync');
      assert.deepEqual(otherGot.items, ['sync']);
    });
  });

  describe('authentication and validation', () => {
    test('missing or wrong bearer → 401, and nothing is published', async () => {
      const room = roomName('api-401');
      const body = { room, data: 'nope' };
      assert.equal((await post(body, { key: null })).status, 401);
      assert.equal((await post(body, { key: 'wrong-key' })).status, 401);
      assert.equal((await post(body, { key: null, headers: { authorization: server.apiKey } })).status, 401);
      assert.equal((await post(body, { key: null, headers: { authorization: `Basic ${server.apiKey}` } })).status, 401);
      const hist = await http(server, 'GET', roomPath(room, 'history'));
      assert.deepEqual(hist.json.messages, []);
    });

    test('presence and history endpoints require the bearer too', async () => {
      const room = roomName('api-401-get');
      assert.equal((await http(server, 'GET', roomPath(room, 'presence'), { key: null })).status, 401);
      assert.equal((await http(server, 'GET', roomPath(room, 'history'), { key: 'wrong' })).status, 401);
    });

    test('malformed JSON → 400', async () => {
      assert.equal((await http(server, 'POST', '/api/publish', { rawBody: '{"room": "x", "data": ' })).status, 400);
      assert.equal((await http(server, 'POST', '/api/publish', { rawBody: 'not json at all' })).status, 400);
    });
  });

  describe('GET endpoints', () => {
    test('presence: {room, users} sorted, room name URL-encoded', async () => {
      const room = `org/acme:${roomName('p')}`;
      const u1 = await openClient(server, { sub: 'zoe' });
      const u2 = await openClient(server, { sub: 'adam' });
      await join(u1.socket, room);
      await join(u2.socket, room);
      const res = await http(server, 'GET', roomPath(room, 'presence'));
      assert.equal(res.status, 200, res.text);
      assertAck(res.json, { room, users: ['adam', 'zoe'] });
      const evRes = await http(server, 'GET', roomPath(room, 'presence', { namespace: '/events' }));
      assertAck(evRes.json, { room, users: [] });
    });

    test('history: since / before / limit, same messages as the socket history', async () => {
      const room = roomName('h');
      const c = await openClient(server, { sub: 'hist-user' });
      await join(c.socket, room);
      for (let i = 1; i <= 8; i++) await publish(c.socket, room, { i });
      const offsets = async (query) => {
        const res = await http(server, 'GET', roomPath(room, 'history', query));
        assert.equal(res.status, 200, res.text);
        assert.equal(res.json.room, room);
        return res.json.messages.map((m) => m.offset);
      };
      assert.deepEqual(await offsets({}), [1, 2, 3, 4, 5, 6, 7, 8]);
      assert.deepEqual(await offsets({ since: 5 }), [6, 7, 8]);
      assert.deepEqual(await offsets({ before: 3 }), [1, 2]);
      assert.deepEqual(await offsets({ since: 1, before: 5 }), [2, 3, 4]);
      assert.deepEqual(await offsets({ since: 2, limit: 2 }), [3, 4]);

      const viaHttp = await http(server, 'GET', roomPath(room, 'history'));
      const viaSocket = await emitAck(c.socket, 'history', { room });
      assert.deepEqual(viaHttp.json.messages, viaSocket.messages);
    });
  });

  describe('operational endpoints', () => {
    test('/health and /ready answer 200', async () => {
      assert.equal((await http(server, 'GET', '/health', { key: null })).status, 200);
      assert.equal((await http(server, 'GET', '/ready', { key: null })).status, 200);
    });

    test('/metrics exposes herald_* metrics in Prometheus text format', async () => {
      // Make sure every metric has had something to record.
      const room = roomName('metrics');
      const c = await openClient(server, { sub: 'metrics-user' });
      await join(c.socket, room);
      const got = collect(c.socket, 'message', (m) => m.room === room);
      for (let i = 0; i < 3; i++) await publish(c.socket, room, i);
      await got.until(3);

      const res = await http(server, 'GET', '/metrics', { key: null });
      assert.equal(res.status, 200);
      assert.match(res.headers.get('content-type') ?? '', /^text\/plain/);
      const names = new Set(
        res.text
          .split('\n')
          .filter((l) => l && !l.startsWith('#'))
          .map((l) => l.match(/^([a-zA-Z_:][a-zA-Z0-9_:]*)/)?.[1])
          .filter(Boolean),
      );
      for (const name of ['herald_connections', 'herald_messages_published_total', 'herald_messages_delivered_total']) {
        assert.ok(names.has(name), `${name} missing; have ${[...names].sort().join(', ')}`);
      }
      assert.ok(
        [...names].some((n) => n.startsWith('herald_delivery_latency_seconds')),
        `herald_delivery_latency_seconds missing; have ${[...names].sort().join(', ')}`,
      );

      // Sum of all samples of `name` (across label sets).
      const sum = (name) =>
        res.text
          .split('\n')
          .map((l) => l.match(/^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{.*\})?\s+(\S+)/))
          .filter((m) => m && m[1] === name)
          .reduce((acc, m) => acc + Number(m[3]), 0);
      assert.ok(sum('herald_messages_published_total') >= 3, 'published counter counts our messages');
      assert.ok(sum('herald_messages_delivered_total') >= 3, 'delivered counter counts our deliveries');
      assert.ok(sum('herald_connections') >= 1, 'at least our connection is counted');
    });
  });
});
