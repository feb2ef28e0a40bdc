'use strict';
// Reference for the benchmark: plain Node socket.io doing the hub's fan-out, nothing else.
// Clients connect with auth {room}; POST /publish {room, text, client_id} emits one
// `im.message` envelope (the hub's shape) to the room. POST /gc runs a full GC (--expose-gc).
const http = require('node:http');
const { Server } = require('socket.io');

let seq = 0;
const hex24 = (n) => n.toString(16).padStart(24, '0');
const AUTHOR_ID = hex24(0x6b163daf);
const chatIds = new Map(); // room -> its chat id, as the hub's
const chatIdOf = (room) => {
  if (!chatIds.has(room)) chatIds.set(room, hex24(0x6b163db0 + chatIds.size));
  return chatIds.get(room);
};
const server = http.createServer((req, res) => {
  const chunks = [];
  req.on('data', (c) => chunks.push(c));
  req.on('end', () => {
    if (req.method === 'POST' && req.url === '/gc' && global.gc) global.gc();
    if (req.method !== 'POST' || req.url !== '/publish') return res.writeHead(204).end();
    const body = JSON.parse(Buffer.concat(chunks).toString() || '{}');
    const micro = new Date().toISOString().replace('Z', '000Z'); // the hub's microseconds
    const chatId = chatIdOf(String(body.room));
    // The message with the hub's fields and sizes (MessageOut in server/im/models.py: 24-hex
    // ids, microsecond timestamps), so that both servers deliver the same bytes per message.
    const message = {
      id: hex24(0x6b16000000 + ++seq), chat_id: chatId, n: seq, author_id: AUTHOR_ID, text: body.text,
      created_at: micro, edited_at: null, deleted: false, system: false,
      client_id: body.client_id, origin: null, files: [],
    };
    io.to(body.room).emit('im.message', { stream: `chat:${chatId}`, seq, type: 'im.message', data: { message }, ts: micro });
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
