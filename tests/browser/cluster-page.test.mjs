// The page through nginx, as a new user tries a fleet: scripts/cluster in development mode (no
// JWT_SECRET), the page loaded from nginx, tokens minted there, websocket-only clients spread over
// the instances, a test event that every card shows, then one instance stopped by hand: its
// client reconnects through nginx to another instance and the next test event reaches everyone.
import assert from 'node:assert/strict';
import { readFileSync } from 'node:fs';
import { mkdir } from 'node:fs/promises';
import { join } from 'node:path';
import { after, before, test } from 'node:test';

import { startCluster } from '../js/cluster-harness.mjs';
import { OUTPUT, launchChromium, waiter } from './herald.mjs';

const WAIT_MS = 20_000;
const until = waiter(WAIT_MS);

let cluster;
let browser;

before(async () => {
  cluster = await startCluster({ devMode: true });
  browser = await launchChromium();
});

after(async () => {
  await browser?.close();
  await cluster?.stop();
});

const instances = (page) =>
  page.evaluate(() => [...document.querySelectorAll('.card [data-role="instance"]')].map((d) => d.textContent));

test('the page through nginx: clients spread, and survive an instance stopped by hand', { timeout: 240_000 }, async () => {
  const page = await browser.newPage({ viewport: { width: 1280, height: 900 } });
  await page.goto(`${cluster.url}/`);
  await page.locator('#mint').waitFor({ state: 'visible', timeout: WAIT_MS });
  await page.locator('#count').fill('3');
  await page.locator('#mint').click();
  await until(page, 'three minted tokens', () => document.querySelector('#tokens').value.split('\n').filter(Boolean).length === 3);

  // No instance URLs: the page connects to where it was loaded from, nginx.
  await page.locator('#transports').selectOption('websocket');
  await page.locator('#connect-all').click();
  await until(page, 'three connected cards', () =>
    [...document.querySelectorAll('.card')].every((c) => c.dataset.state === 'connected' && /^herald-\d$/.test(c.querySelector('[data-role="instance"]').textContent)),
  );
  const before = await instances(page);
  assert.ok(new Set(before).size >= 2, `websocket-only clients spread over instances: ${before}`);

  await page.locator('#room').fill('demo');
  await page.locator('#join-all').click();
  await until(page, 'every card in demo', () =>
    [...document.querySelectorAll('.card [data-role="rooms"]')].every((d) => /^demo #\d+$/.test(d.textContent)),
  );
  await page.locator('#send').click();
  await until(page, 'all three cards to receive the test event', () =>
    [...document.querySelectorAll('.card')].every((c) => c.dataset.delivery === 'ok'),
  );

  // Stop client 1's instance by hand, as the README suggests.
  const stopped = before[0];
  const pid = Number(readFileSync(join(cluster.dir, `${stopped}.pid`), 'utf8'));
  process.kill(pid, 'SIGTERM');
  await until(
    page,
    `client 1 to reconnect away from ${stopped}`,
    (stopped) => {
      const c = document.querySelector('.card[data-client="1"]');
      const instance = c.querySelector('[data-role="instance"]').textContent;
      return c.dataset.state === 'connected' && /^herald-\d$/.test(instance) && instance !== stopped;
    },
    stopped,
  );
  await until(page, 'every card back in demo', () =>
    [...document.querySelectorAll('.card [data-role="rooms"]')].every((d) => /^demo #\d+$/.test(d.textContent)),
  );
  await page.locator('#send').click();
  await until(page, 'everyone to receive the second test event', () =>
    [...document.querySelectorAll('.card [data-role="delivery-main"]')].every((d) => d.dataset.offset === '2'),
  );
  assert.ok(!(await instances(page)).includes(stopped), 'nobody is left on the stopped instance');
  await mkdir(OUTPUT, { recursive: true });
  await page.screenshot({ path: join(OUTPUT, 'page-through-nginx.png'), fullPage: true });
  await page.close();
});
