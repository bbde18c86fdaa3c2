// The page herald serves at `/`, driven in headless Chromium: mint dev tokens, connect three
// clients, join a room, send a test event that every card shows, then disconnect one client,
// publish while it is away and watch it recover what it missed on reconnect.
//
// Run: cargo build -p herald-server && (cd tests/browser && npm ci) && node --test tests/browser/
import assert from 'node:assert/strict';
import { mkdir, mkdtemp, readFile } from 'node:fs/promises';
import { join } from 'node:path';
import { after, before, test } from 'node:test';

import { tmpdir } from 'node:os';
import { OUTPUT, REPO, launchChromium, startHerald, startRedis, waiter } from './herald.mjs';

const WAIT_MS = 10_000;
const until = waiter(WAIT_MS);

// The instances the page spreads its clients over, round robin: two, sharing one Redis, so
// every test event crosses instances.
const INSTANCES = ['page-1', 'page-2'];

let servers = [];
let redis;
let browser;

before(async () => {
  redis = await startRedis();
  // One data dir: the instances share the generated development secret, so a token minted
  // by one is accepted by the other. The first creates it; the second starts after.
  const dataDir = await mkdtemp(join(tmpdir(), 'herald-browser-fleet-'));
  const env = { REDIS_URL: redis.url, HERALD_REDIS_KEY: `page-${process.pid}-${Date.now()}` };
  for (const instanceId of INSTANCES) servers.push(await startHerald({ instanceId, env, dataDir }));
  browser = await launchChromium();
});

after(async () => {
  await browser?.close();
  await Promise.all(servers.map((s) => s.stop()));
  await redis?.stop();
});

const card = (page, n) => page.locator(`.card[data-client="${n}"]`);
const field = (page, n, role) => card(page, n).locator(`[data-role="${role}"]`);

test('the vendored socket.io-client is served as is, with a content type and cache header', async () => {
  const response = await fetch(`${servers[0].url}/assets/socket.io.min.js`);
  assert.equal(response.status, 200);
  assert.match(response.headers.get('content-type'), /^text\/javascript/);
  assert.match(response.headers.get('cache-control'), /max-age=\d+/);
  const served = Buffer.from(await response.arrayBuffer());
  const vendored = await readFile(join(REPO, 'web/vendor/socket.io.min.js'));
  assert.ok(served.equals(vendored), 'the binary embeds web/vendor/socket.io.min.js');
  assert.match(served.subarray(0, 64).toString(), /Socket\.IO v4\.8\.\d+/);
});

test('three clients see a test event, and one recovers what it missed while away', { timeout: 90_000 }, async () => {
  const page = await browser.newPage({ viewport: { width: 1280, height: 900 } });
  const errors = [];
  page.on('console', (message) => {
    if (message.type() === 'error') errors.push(`console: ${message.text()}`);
  });
  page.on('pageerror', (error) => errors.push(`pageerror: ${error.message}`));

  await page.goto(`${servers[0].url}/`);
  assert.match(await page.title(), /herald/);
  assert.match(await page.locator('.lead').innerText(), /real-time messaging server/);

  // Dev mode: the mint button is there and fills in one token per client.
  await page.locator('#mint').waitFor({ state: 'visible', timeout: WAIT_MS });
  await page.locator('#count').fill('3');
  await page.locator('#mint').click();
  await until(page, 'three minted tokens', () => document.querySelector('#tokens').value.split('\n').filter(Boolean).length === 3);

  // Three clients, round robin over the instances.
  await page.locator('#urls').fill(servers.map((s) => s.url).join('\n'));
  await page.locator('#connect-all').click();
  const users = ['alice', 'bob', 'carol'];
  const expected = users.map((user, i) => ({ user, instance: servers[i % servers.length].instanceId }));
  await until(
    page,
    'three connected cards with their user, instance and websocket transport',
    (expected) => {
      const cards = [...document.querySelectorAll('.card')];
      const text = (c, role) => c.querySelector(`[data-role="${role}"]`).textContent;
      return (
        cards.length === expected.length &&
        cards.every(
          (c, i) =>
            c.dataset.state === 'connected' &&
            text(c, 'user') === expected[i].user &&
            text(c, 'instance') === expected[i].instance &&
            text(c, 'transport') === 'websocket',
        )
      );
    },
    expected,
  );

  // Everyone joins the room; presence lists all three users.
  await page.locator('#room').fill('demo');
  await page.locator('#join-all').click();
  await until(page, 'every card in demo', () =>
    [...document.querySelectorAll('.card [data-role="rooms"]')].every((d) => /^demo #\d+$/.test(d.textContent)),
  );
  await until(
    page,
    'presence to list alice, bob and carol',
    () => [...document.querySelectorAll('#presence li:not(.left)')].map((li) => li.textContent).join(',') === 'alice,bob,carol',
  );

  // A test event from client 1 lights up all three cards, each with offset and latency.
  await page.locator('#sender').selectOption('0');
  await page.locator('#send').click();
  await until(page, 'all three cards to receive the test event', () =>
    [...document.querySelectorAll('.card')].every((c) => c.dataset.delivery === 'ok'),
  );
  for (const n of [1, 2, 3]) {
    const main = field(page, n, 'delivery-main');
    assert.equal(await main.getAttribute('data-offset'), '1');
    assert.ok(Number(await main.getAttribute('data-latency')) >= 0);
    assert.match(await main.innerText(), /^#1 in [\d.]+ (ms|s)$/);
    assert.match(await field(page, n, 'delivery-detail').innerText(), /offset 1 · latency [\d.]+ (ms|s) · from alice/);
  }
  await until(page, 'the summary line', () => /3 of 3 clients received it/.test(document.querySelector('#send-result').textContent));

  // Client 3 goes away; client 1 publishes twice; client 3 misses both, visibly.
  await card(page, 3).locator('[data-action="toggle"]').click();
  await until(page, 'client 3 to be disconnected', () => document.querySelector('.card[data-client="3"]').dataset.state === 'disconnected');
  await until(
    page,
    'carol to leave the presence list',
    () => ![...document.querySelectorAll('#presence li:not(.left)')].some((li) => li.textContent === 'carol'),
  );
  for (const offset of [2, 3]) {
    await card(page, 1).locator('[data-action="send"]').click();
    await until(
      page,
      `client 2 to receive offset ${offset}`,
      (offset) => document.querySelector('.card[data-client="2"] [data-role="delivery-main"]').dataset.offset === String(offset),
      offset,
    );
  }
  await until(page, 'client 3 to be marked missed', () => document.querySelector('.card[data-client="3"]').dataset.delivery === 'missed');
  assert.match(await field(page, 3, 'delivery-main').innerText(), /missed/);
  await mkdir(OUTPUT, { recursive: true });
  await page.screenshot({ path: join(OUTPUT, 'page-missed.png'), fullPage: true });

  // Back again: it re-joins from its last offset and gets both messages before the ack.
  await card(page, 3).locator('[data-action="toggle"]').click();
  await until(page, 'client 3 to recover 2 messages', () =>
    /recovered 2 missed messages/.test(document.querySelector('.card[data-client="3"] [data-role="recovery"]').textContent),
  );
  assert.equal(await card(page, 3).getAttribute('data-state'), 'connected');
  assert.equal(await card(page, 3).getAttribute('data-delivery'), 'late');
  assert.equal(await field(page, 3, 'delivery-main').getAttribute('data-offset'), '3');
  assert.match(await field(page, 3, 'rooms').innerText(), /^demo #3$/);

  // History on demand; the instance's counters and chart.
  await page.locator('#load-history').click();
  await until(page, 'three history entries', () => document.querySelectorAll('#history li').length === 3);
  assert.match(await page.locator('#history li').first().innerText(), /#3 .*alice: test event 3 from client 1/);
  // Clients 1 and 3 are on the first instance, client 2 on the second.
  await until(page, 'the instance panels to count 2 and 1 connections', () => {
    const numbers = [...document.querySelectorAll('.instance-stat .numbers')].map((n) => n.textContent ?? '');
    return numbers.length === 2 && /^2 connections/.test(numbers[0]) && /^1 connection/.test(numbers[1]);
  });
  assert.match(await page.locator('.instance-stat .title').first().innerText(), /^page-1 · http:\/\/127\.0\.0\.1:\d+$/);

  await page.waitForTimeout(1200); // one more stats poll, so the chart has a line
  await page.screenshot({ path: join(OUTPUT, 'page.png'), fullPage: true });

  // A phone's width: no sideways scrolling.
  await page.setViewportSize({ width: 390, height: 844 });
  await page.waitForTimeout(300);
  const overflow = await page.evaluate(() => document.documentElement.scrollWidth - window.innerWidth);
  assert.ok(overflow <= 0, `the page is ${overflow}px wider than a phone`);
  await page.screenshot({ path: join(OUTPUT, 'page-phone.png'), fullPage: true });

  assert.deepEqual(errors, [], 'no console errors');
  await page.close();
});

test('with a JWT secret there is no mint button, and clients without a token are refused visibly', { timeout: 60_000 }, async () => {
  const server = await startHerald({ instanceId: 'page-secret', env: { JWT_SECRET: 'browser-test-secret' } });
  const page = await browser.newPage({ viewport: { width: 1280, height: 900 } });
  const errors = [];
  page.on('console', (message) => {
    // A refused client closes its Engine.IO session; a long-poll GET or the close POST still
    // in flight then gets 400 "Session ID unknown", which Chromium logs. That is
    // socket.io-client's polling close racing the server, not the page: tolerated here only.
    const pollingAfterClose =
      /status of 400/.test(message.text()) && /\/socket\.io\/\?EIO=4&transport=polling/.test(message.location().url);
    if (message.type() === 'error' && !pollingAfterClose) errors.push(`console: ${message.text()} (${message.location().url})`);
  });
  page.on('pageerror', (error) => errors.push(`pageerror: ${error.message}`));
  try {
    await page.goto(`${server.url}/`);
    await until(page, 'the token hint', () => /herald token --sub/.test(document.querySelector('#mint-hint').textContent));
    assert.equal(await page.locator('#mint').isVisible(), false);
    assert.equal(await page.locator('#mode').isVisible(), false);
    const minted = await fetch(`${server.url}/dev/token`, { method: 'POST', body: '{"sub":"x"}' });
    assert.equal(minted.status, 404);

    await page.locator('#count').fill('2');
    await page.locator('#connect-all').click();
    await until(page, 'both cards refused', () =>
      [...document.querySelectorAll('.card')].every((c) => c.dataset.state === 'refused'),
    );
    assert.match(await field(page, 1, 'state').innerText(), /refused: unauthorized/);
    assert.equal(await card(page, 1).locator('[data-action="toggle"]').innerText(), 'Reconnect');
    assert.match(await page.locator('#log').innerText(), /mint or paste a valid token/);
    assert.deepEqual(errors, [], 'no console errors');
  } finally {
    await page.close();
    await server.stop();
  }
});
