'use strict';
// Reference for the benchmark: plain Node socket.io doing the hub's fan-out, nothing else.
// Clients connect with auth {room}; POST /publish {room, text, client_id} emits one
// `im.message` envelope (the hub's shape) to the room. POST /gc runs a full GC (--expose-gc).
const http = require('node:http');
const { Server } = require('socket.io');

let seq = 0;
const server = http.createServer((req, res) => {
  const chunks = [];
  req.on('data', (c) => chunks.push(c));
  req.on('end', () => {
    if (req.method === 'POST' && req.url === '/gc' && global.gc) global.gc();
    if (req.method !== 'POST' || req.url !== '/publish') return res.writeHead(204).end();
    const body = JSON.parse(Buffer.concat(chunks).toString() || '{}');
    const ts = new Date().toISOString();
    const message = { id: String(++seq), chat_id: body.room, text: body.text, client_id: body.client_id, created_at: ts };
    io.to(body.room).emit('im.message', { stream: body.room, seq, type: 'im.message', data: { message }, ts });
    res.writeHead(201, { 'content-type': 'application/json' }).end(JSON.stringify({ messages: [message] }));
  });
});
const io = new Server(server, { transports: ['websocket'], serveClient: false });
io.on('connection', (socket) => {
  socket.join(String(socket.handshake.auth.room || 'chat'));
  socket.emit('snapshot', { streams: {} });
});
process.stdin.on('end', () => process.exit(0)).resume(); // the benchmark is gone: stop too
server.listen(Number(process.argv[2] || 0), '127.0.0.1', () => {
  console.log(JSON.stringify({ port: server.address().port, pid: process.pid }));
});
