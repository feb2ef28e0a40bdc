'use strict';
// A socket.io server that breaks delivery on purpose, to show that the benchmark's load
// generator (bench/node/loadgen.js) counts what goes wrong. Like bench/node/reference-server.js,
// but `node faulty-server.js MODE`: "clean" emits each published message once, in seq order;
// "double" emits each twice; "reorder" emits every pair of messages in the opposite order of
// their seqs; "drop" never emits every 4th message. Run with NODE_PATH=bench/node/node_modules.
const http = require('node:http');
const { Server } = require('socket.io');

const mode = process.argv[2] || 'clean';
let seq = 0;
let held = null;
let heldTimer = null;

function envelope(body) {
  seq += 1;
  const message = { id: String(seq), chat_id: body.room, text: body.text, client_id: body.client_id };
  return { stream: body.room, seq, type: 'im.message', data: { message }, ts: new Date().toISOString() };
}

function emit(env) {
  io.to(env.stream).emit('im.message', env);
}

function publish(body) {
  const env = envelope(body);
  if (mode === 'double') {
    emit(env);
    emit(env);
  } else if (mode === 'drop') {
    if (env.seq % 4 !== 0) emit(env);
  } else if (mode === 'reorder') {
    if (held === null) {
      held = env;
      heldTimer = setTimeout(() => {
        emit(held);
        held = null;
      }, 200);
    } else {
      clearTimeout(heldTimer);
      emit(env); // the higher seq first
      emit(held);
      held = null;
    }
  } else {
    emit(env);
  }
  return env;
}

const server = http.createServer((req, res) => {
  const chunks = [];
  req.on('data', (c) => chunks.push(c));
  req.on('end', () => {
    if (req.method !== 'POST' || req.url !== '/publish') return res.writeHead(204).end();
    const env = publish(JSON.parse(Buffer.concat(chunks).toString() || '{}'));
    res.writeHead(201, { 'content-type': 'application/json' }).end(JSON.stringify(env.data));
  });
});
const io = new Server(server, { transports: ['websocket'], serveClient: false });
io.on('connection', (socket) => {
  socket.join(String(socket.handshake.auth.room || 'chat'));
  socket.emit('snapshot', { streams: {} });
});
process.stdin.on('end', () => process.exit(0)).resume();
server.listen(0, '127.0.0.1', () => {
  console.log(JSON.stringify({ port: server.address().port }));
});
