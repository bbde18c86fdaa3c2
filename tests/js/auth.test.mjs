// Authentication: HS256 tokens via `auth` and via the query string, the
// `session` event, every flavour of bad token (→ connect_error "unauthorized"),
// RS256 / ES256 public-key verification (PEM text and PEM file path), unknown
// namespaces, and token checks on the plain /ws upgrade.

import assert from 'node:assert/strict';
import { generateKeyPairSync } from 'node:crypto';
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { after, before, describe, test } from 'node:test';
import {
  claims,
  collect,
  connect,
  connected,
  connectError,
  nowSecs,
  openClient,
  signJwt,
  startHerald,
  token,
  waitFor,
  wsConnect,
  wsRefusedStatus,
} from './harness.mjs';

/** Connect with `opts` and assert the server refuses with "unauthorized". */
async function assertUnauthorized(url, tok, opts = {}) {
  const socket = connect(url, tok, opts);
  const sessions = collect(socket, 'session');
  const err = await connectError(socket);
  assert.equal(err.message, 'unauthorized');
  assert.equal(socket.connected, false, 'socket must not be connected');
  assert.deepEqual(sessions.items, [], 'no session event for a refused socket');
  socket.close();
}

/** Connect with a token and assert the session names `sub`. */
async function assertAccepted(server, tok, sub) {
  const socket = connect(server.url, tok);
  const session = waitFor(socket, 'session', 10_000);
  await connected(socket);
  assert.equal((await session).user, sub);
  socket.close();
}

describe('HS256 (JWT_SECRET)', { timeout: 60_000 }, () => {
  let server;
  before(async () => {
    server = await startHerald();
  });

  test('token in auth connects and receives a session event', async () => {
    const { socket, session } = await openClient(server, { sub: 'alice' });
    assert.equal(socket.connected, true);
    assert.deepEqual(Object.keys(session).sort(), ['instance', 'sid', 'user']);
    assert.equal(session.user, 'alice');
    assert.equal(session.instance, server.instance);
    assert.equal(typeof session.sid, 'string');
    assert.ok(session.sid.length > 0, 'sid is non-empty');
  });

  test('token in the query string connects', async () => {
    const tok = token(server.secret, { sub: 'query-user' });
    const socket = connect(server.url, null, { query: { token: tok } });
    const session = waitFor(socket, 'session', 10_000);
    await connected(socket);
    assert.equal((await session).user, 'query-user');
    assert.equal((await session).instance, server.instance);
  });

  test('each connection gets its own sid', async () => {
    const a = await openClient(server, { sub: 'same-user' });
    const b = await openClient(server, { sub: 'same-user' });
    assert.notEqual(a.session.sid, b.session.sid);
    assert.equal(a.session.user, b.session.user);
  });

  test('the /events namespace authenticates too', async () => {
    const { session } = await openClient(server, { sub: 'ev-user', ns: '/events' });
    assert.equal(session.user, 'ev-user');
    await assertUnauthorized(`${server.url}/events`, token('wrong-secret', { sub: 'ev-user' }));
  });

  test('bad signature → unauthorized', async () => {
    await assertUnauthorized(server.url, token(`${server.secret}-not`, { sub: 'mallory' }));
  });

  test('tampered payload → unauthorized', async () => {
    const [h, , s] = token(server.secret, { sub: 'mallory' }).split('.');
    const forged = Buffer.from(JSON.stringify(claims({ sub: 'admin' }))).toString('base64url');
    await assertUnauthorized(server.url, `${h}.${forged}.${s}`);
  });

  test('missing token → unauthorized', async () => {
    await assertUnauthorized(server.url, null);
  });

  test('expired token → unauthorized', async () => {
    const now = nowSecs();
    await assertUnauthorized(server.url, token(server.secret, { sub: 'late', iat: now - 7200, exp: now - 600 }));
  });

  test('garbage tokens → unauthorized', async () => {
    for (const garbage of ['garbage', 'not.a.jwt', '', 'a.b.c.d', 12345]) {
      await assertUnauthorized(server.url, garbage);
    }
  });

  test('garbage in the query string → unauthorized', async () => {
    await assertUnauthorized(server.url, null, { query: { token: 'garbage' } });
  });

  test('alg "none" → unauthorized', async () => {
    await assertUnauthorized(server.url, signJwt('none', null, claims({ sub: 'nobody' })));
  });

  test('a token not valid yet (nbf in the future) → unauthorized, and 401 on /ws', async () => {
    const now = nowSecs();
    const early = token(server.secret, { sub: 'early', nbf: now + 300 });
    await assertUnauthorized(server.url, early);
    assert.equal(await wsRefusedStatus(server, early), 401);
  });

  test('/ws: alg "none" → 401', async () => {
    assert.equal(await wsRefusedStatus(server, signJwt('none', null, claims({ sub: 'nobody' }))), 401);
  });

  test('unknown namespace is refused', async () => {
    const socket = connect(`${server.url}/nope`, token(server.secret, { sub: 'alice' }));
    const err = await connectError(socket);
    assert.ok(err instanceof Error);
    assert.equal(socket.connected, false);
  });

  test('/ws: token in query and in Authorization header are accepted', async () => {
    const viaQuery = await wsConnect(server, token(server.secret, { sub: 'ws-q' }));
    const s1 = await viaQuery.session;
    assert.equal(s1.user, 'ws-q');
    assert.equal(s1.instance, server.instance);
    assert.equal(typeof s1.sid, 'string');

    const viaHeader = await wsConnect(server, null, {
      headers: { Authorization: `Bearer ${token(server.secret, { sub: 'ws-h' })}` },
    });
    assert.equal((await viaHeader.session).user, 'ws-h');
  });

  test('/ws: bad, expired, garbage or missing token → HTTP 401', async () => {
    const now = nowSecs();
    assert.equal(await wsRefusedStatus(server, token('wrong', { sub: 'x' })), 401);
    assert.equal(await wsRefusedStatus(server, token(server.secret, { sub: 'x', exp: now - 600 })), 401);
    assert.equal(await wsRefusedStatus(server, 'garbage'), 401);
    assert.equal(await wsRefusedStatus(server, null), 401);
    assert.equal(await wsRefusedStatus(server, null, { headers: { Authorization: 'Bearer garbage' } }), 401);
  });
});

describe('RS256 (HERALD_JWT_PUBLIC_KEY as PEM text)', { timeout: 60_000 }, () => {
  const { publicKey, privateKey } = generateKeyPairSync('rsa', { modulusLength: 2048 });
  const other = generateKeyPairSync('rsa', { modulusLength: 2048 });
  const pem = publicKey.export({ type: 'spki', format: 'pem' });
  let server;
  before(async () => {
    server = await startHerald({ HERALD_JWT_PUBLIC_KEY: pem });
  });

  test('token signed with the matching private key is accepted', async () => {
    await assertAccepted(server, signJwt('RS256', privateKey, claims({ sub: 'rsa-user' })), 'rsa-user');
  });

  test('token signed with a different RSA key is rejected', async () => {
    await assertUnauthorized(server.url, signJwt('RS256', other.privateKey, claims({ sub: 'rsa-user' })));
  });

  test('expired RS256 token is rejected', async () => {
    const now = nowSecs();
    await assertUnauthorized(
      server.url,
      signJwt('RS256', privateKey, claims({ sub: 'rsa-user', iat: now - 7200, exp: now - 600 })),
    );
  });

  test('HS256 token keyed with the public key PEM (algorithm confusion) is rejected', async () => {
    await assertUnauthorized(server.url, signJwt('HS256', pem, claims({ sub: 'confused' })));
  });

  test('/ws: algorithm confusion, alg "none" and a foreign key → 401', async () => {
    assert.equal(await wsRefusedStatus(server, signJwt('HS256', pem, claims({ sub: 'confused' }))), 401);
    assert.equal(await wsRefusedStatus(server, signJwt('none', null, claims({ sub: 'confused' }))), 401);
    assert.equal(await wsRefusedStatus(server, signJwt('RS256', other.privateKey, claims({ sub: 'x' }))), 401);
  });
});

describe('RS256 (HERALD_JWT_PUBLIC_KEY as a path to a PEM file)', { timeout: 60_000 }, () => {
  const { publicKey, privateKey } = generateKeyPairSync('rsa', { modulusLength: 2048 });
  const other = generateKeyPairSync('rsa', { modulusLength: 2048 });
  const dir = mkdtempSync(path.join(tmpdir(), 'herald-js-key-'));
  let server;
  after(() => rmSync(dir, { recursive: true, force: true }));
  before(async () => {
    const keyPath = path.join(dir, 'jwt-public.pem');
    writeFileSync(keyPath, publicKey.export({ type: 'spki', format: 'pem' }));
    server = await startHerald({ HERALD_JWT_PUBLIC_KEY: keyPath });
  });

  test('token signed with the matching private key is accepted', async () => {
    await assertAccepted(server, signJwt('RS256', privateKey, claims({ sub: 'rsa-file' })), 'rsa-file');
  });

  test('token signed with a different RSA key is rejected', async () => {
    await assertUnauthorized(server.url, signJwt('RS256', other.privateKey, claims({ sub: 'rsa-file' })));
  });
});

describe('ES256 (HERALD_JWT_PUBLIC_KEY as PEM text)', { timeout: 60_000 }, () => {
  const { publicKey, privateKey } = generateKeyPairSync('ec', { namedCurve: 'P-256' });
  const other = generateKeyPairSync('ec', { namedCurve: 'P-256' });
  let server;
  before(async () => {
    server = await startHerald({ HERALD_JWT_PUBLIC_KEY: publicKey.export({ type: 'spki', format: 'pem' }) });
  });

  test('token signed with the matching private key is accepted', async () => {
    await assertAccepted(server, signJwt('ES256', privateKey, claims({ sub: 'ec-user' })), 'ec-user');
  });

  test('token signed with a different EC key is rejected', async () => {
    await assertUnauthorized(server.url, signJwt('ES256', other.privateKey, claims({ sub: 'ec-user' })));
  });

  test('/ws accepts ES256 and refuses a foreign key with 401', async () => {
    const ws = await wsConnect(server, signJwt('ES256', privateKey, claims({ sub: 'ec-ws' })));
    assert.equal((await ws.session).user, 'ec-ws');
    assert.equal(await wsRefusedStatus(server, signJwt('ES256', other.privateKey, claims({ sub: 'ec-ws' }))), 401);
  });
});
