#!/usr/bin/env node
// The client side of `benches/replay-memory.sh`: publishes PER_ROOM messages of about SIZE
// bytes into each of ROOMS rooms through the HTTP API, then connects CLIENTS Socket.IO
// clients (the real socket.io-client, websocket transport) that each join one room with
// `since: 0` and replay its history. Prints one line per phase, then `ready` once every
// client has its whole replay, and holds the connections until stdin closes.
//
// Env: URL (http://host:port), TOKEN (a JWT), API_KEY, CLIENTS, ROOMS, PER_ROOM, SIZE.

import process from 'node:process';
import { io } from 'socket.io-client';

const url = process.env.URL;
const token = process.env.TOKEN;
const clients = Number(process.env.CLIENTS ?? 1000);
const rooms = Number(process.env.ROOMS ?? 20);
const perRoom = Number(process.env.PER_ROOM ?? 1000);
const pad = 'x'.repeat(Math.max(0, Number(process.env.SIZE ?? 500) - 40));

for (let r = 0; r < rooms; r++) {
  for (let first = 0; first < perRoom; first += 500) {
    const messages = [];
    for (let i = first; i < Math.min(perRoom, first + 500); i++) {
      messages.push({ room: `replay-${r}`, data: { i, pad } });
    }
    const res = await fetch(`${url}/api/publish`, {
      method: 'POST',
      headers: { 'content-type': 'application/json', authorization: `Bearer ${process.env.API_KEY}` },
      body: JSON.stringify({ messages }),
    });
    if (!res.ok) throw new Error(`publish: ${res.status} ${await res.text()}`);
  }
}
console.log(`published ${rooms * perRoom} messages`);

const started = Date.now();
let received = 0;
const sockets = [];
await Promise.all(
  Array.from({ length: clients }, (_, i) => new Promise((resolve, reject) => {
    const socket = io(url, { transports: ['websocket'], auth: { token }, forceNew: true, reconnection: false });
    sockets.push(socket);
    socket.on('message', () => {
      received++;
    });
    socket.on('connect', () => {
      socket.emit('join', { room: `replay-${i % rooms}`, since: 0 }, (ack) => {
        if (ack?.ok && ack.recovered) resolve();
        else reject(new Error(`join: ${JSON.stringify(ack)}`));
      });
    });
    socket.on('connect_error', reject);
  })),
);
while (received < clients * perRoom) {
  if (Date.now() - started > 120_000) throw new Error(`replay: ${received} of ${clients * perRoom} after 120 s`);
  await new Promise((r) => setTimeout(r, 50));
}
const seconds = (Date.now() - started) / 1000;
console.log(`replayed ${received} messages to ${clients} clients in ${seconds.toFixed(2)} s`);
console.log('ready');

process.stdin.resume();
process.stdin.on('end', () => {
  for (const socket of sockets) socket.close();
  process.exit(0);
});
