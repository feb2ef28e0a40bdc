'use strict';
// Raw Engine.IO/Socket.IO websocket clients for the transport micro-benchmark
// (bench/fanout_micro.py): no socket.io-client, so that the clients cost as little as
// possible and the server is what is measured. One JSON command per line on stdin, one JSON
// answer per line on stdout.
//
//   {"cmd":"connect","url":...,"tokens":[...],"count":N,"parallel":50,"ready":"snapshot"}
//       opens N more websockets (tokens round-robin), each ready at its first `ready` event.
//   {"cmd":"expect","count":K,"timeout":S}
//       waits until every reading client got K `bench` events since the last reset; answers
//       with when the last one arrived, and what was lost, doubled or out of order.
//   {"cmd":"reset"}        forgets what was received.
//   {"cmd":"stall","count":M} the first M clients stop reading their socket (a slow reader).
//   {"cmd":"status"}       how many clients are still open.
//   {"cmd":"exit"}
const WebSocket = require('ws');
const readline = require('node:readline');
const { performance } = require('node:perf_hooks');

const clients = [];

function out(obj) {
  process.stdout.write(JSON.stringify(obj) + '\n');
}

function reset() {
  for (const c of clients) {
    c.received = 0;
    c.last = -1;
    c.disorder = 0;
    c.lastAt = 0;
  }
}

function connectOne(url, token, ready) {
  return new Promise((resolve) => {
    const t0 = performance.now();
    const ws = new WebSocket(url.replace(/^http/, 'ws') + '/socket.io/?EIO=4&transport=websocket', {
      perMessageDeflate: false,
    });
    const c = { ws, received: 0, last: -1, disorder: 0, lastAt: 0, open: true, stalled: false };
    let done = false;
    const finish = (ok, why) => {
      if (done) return;
      done = true;
      resolve({ ok, c, ms: performance.now() - t0, why });
    };
    ws.on('message', (raw) => {
      const text = raw.toString();
      if (text === '2') {
        ws.send('3');
        return;
      }
      if (text[0] === '0') {
        ws.send('40' + JSON.stringify({ token }));
        return;
      }
      if (text.startsWith('40')) {
        if (ready === 'connect') finish(true);
        return;
      }
      if (text.startsWith('44')) {
        finish(false, text.slice(2, 200));
        return;
      }
      if (!text.startsWith('42')) return;
      const comma = text.indexOf(',');
      const name = JSON.parse(text.slice(3, comma));
      if (name === ready) finish(true);
      if (name !== 'bench') return;
      const seq = JSON.parse(text.slice(2))[1].seq;
      if (seq <= c.last) c.disorder += 1;
      c.last = seq;
      c.received += 1;
      c.lastAt = performance.now();
    });
    ws.on('close', () => {
      c.open = false;
      finish(false, 'closed');
    });
    ws.on('error', (err) => finish(false, String(err)));
  });
}

async function connect(cmd) {
  const t0 = performance.now();
  let next = 0;
  const failures = {};
  const times = [];
  async function worker() {
    while (next < cmd.count) {
      const i = next++;
      const token = cmd.tokens[(clients.length + i) % cmd.tokens.length];
      const r = await connectOne(cmd.url, token, cmd.ready || 'snapshot');
      if (r.ok) {
        clients.push(r.c);
        times.push(r.ms);
      } else {
        failures[r.why] = (failures[r.why] || 0) + 1;
        r.c.ws.terminate();
      }
    }
  }
  await Promise.all(Array.from({ length: Math.min(cmd.parallel || 50, cmd.count) }, worker));
  const seconds = (performance.now() - t0) / 1000;
  times.sort((a, b) => a - b);
  return {
    ok: Object.keys(failures).length === 0,
    connected: times.length,
    failures,
    seconds,
    per_second: times.length / seconds,
    p50_ms: times[Math.floor(times.length / 2)],
  };
}

async function expect(cmd) {
  const deadline = performance.now() + (cmd.timeout || 60) * 1000;
  const readers = () => clients.filter((c) => !c.stalled && c.open);
  while (performance.now() < deadline) {
    if (readers().every((c) => c.received >= cmd.count)) break;
    await new Promise((r) => setTimeout(r, 2));
  }
  const rs = readers();
  let lastAt = 0;
  let lost = 0;
  let extra = 0;
  let disorder = 0;
  for (const c of rs) {
    lastAt = Math.max(lastAt, c.lastAt);
    if (c.received < cmd.count) lost += cmd.count - c.received;
    if (c.received > cmd.count) extra += c.received - cmd.count;
    disorder += c.disorder;
  }
  return {
    ok: true,
    readers: rs.length,
    last_at_ms: lastAt,
    now_ms: performance.now(),
    lost,
    extra,
    disorder,
    closed: clients.filter((c) => !c.open).length,
  };
}

async function handle(cmd) {
  switch (cmd.cmd) {
    case 'connect':
      return connect(cmd);
    case 'expect':
      return expect(cmd);
    case 'reset':
      reset();
      return { ok: true, now_ms: performance.now() };
    case 'stall':
      for (const c of clients.slice(0, cmd.count)) {
        c.stalled = true;
        c.ws._socket.pause();
      }
      return { ok: true };
    case 'status':
      return { ok: true, open: clients.filter((c) => c.open).length, total: clients.length };
    case 'exit':
      for (const c of clients) c.ws.terminate();
      setTimeout(() => process.exit(0), 50);
      return { ok: true };
    default:
      return { ok: false, error: 'unknown command ' + cmd.cmd };
  }
}

const rl = readline.createInterface({ input: process.stdin });
let chain = Promise.resolve();
rl.on('line', (line) => {
  chain = chain.then(async () => {
    try {
      out(await handle(JSON.parse(line)));
    } catch (err) {
      out({ ok: false, error: String((err && err.stack) || err) });
    }
  });
});
rl.on('close', () => {
  for (const c of clients) c.ws.terminate();
  process.exit(0);
});
