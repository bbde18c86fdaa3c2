// Load version of the connect race: 5,000 websocket clients each emit `join`
// immediately after io(), before CONNECT. Every one must get an ok ack.
// Clients are opened a few hundred at a time and kept open until the end, so
// the server holds all 5,000 connections at once (the harness closes them
// after the test). Uses its own server. HERALD_LOAD_CLIENTS overrides the count.

import assert from 'node:assert/strict';
import { before, test } from 'node:test';
import { connect, http, roomPath, startHerald, token } from './harness.mjs';

const CLIENTS = Number(process.env.HERALD_LOAD_CLIENTS ?? 5000);
const CONCURRENCY = 250;
const ROOMS = 500;
const ACK_TIMEOUT_MS = 60_000;

let server;
const sockets = [];

before(async () => {
  server = await startHerald();
});

/** Open client `i`, emit join before connect, resolve with an outcome tag. */
function raceOne(i) {
  const room = `load:${i % ROOMS}`;
  const s = connect(server.url, token(server.secret, { sub: `load-${i}` }));
  sockets.push(s);
  return new Promise((resolve) => {
    const finish = (outcome) => {
      clearTimeout(timer);
      s.off('connect_error', onError);
      resolve(outcome);
    };
    const onError = (err) => finish(`connect_error: ${err?.message}`);
    const timer = setTimeout(() => finish('ack timeout'), ACK_TIMEOUT_MS);
    s.on('connect_error', onError);
    s.emit('join', room, (ack) => {
      if (ack?.ok === true && ack.room === room) finish('ok');
      else finish(`bad ack: ${JSON.stringify(ack)}`);
    });
  });
}

test(`${CLIENTS} clients emitting join before connect all get ok acks`, { timeout: 120_000 }, async () => {
  const outcomes = new Map();
  let next = 0;
  const started = Date.now();
  async function worker() {
    while (next < CLIENTS) {
      const i = next++;
      const outcome = await raceOne(i);
      outcomes.set(outcome, (outcomes.get(outcome) ?? 0) + 1);
    }
  }
  await Promise.all(Array.from({ length: CONCURRENCY }, worker));
  const elapsed = ((Date.now() - started) / 1000).toFixed(1);

  const summary = JSON.stringify(Object.fromEntries(outcomes));
  assert.equal(outcomes.get('ok') ?? 0, CLIENTS, `outcomes after ${elapsed}s: ${summary}`);
  assert.equal(
    sockets.filter((s) => s.connected).length,
    CLIENTS,
    'every client is still connected',
  );

  // What a user of room load:0 sees: all of its members are present.
  const res = await http(server, 'GET', roomPath('load:0', 'presence'));
  assert.equal(res.status, 200, res.text);
  const expected = [];
  for (let i = 0; i < CLIENTS; i += ROOMS) expected.push(`load-${i}`);
  assert.deepEqual(res.json.users, expected.sort());
});
