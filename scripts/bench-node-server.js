// The cold-start baseline of scripts/bench: the smallest Node.js custom handler — plain
// http.createServer answering 200 on every path, on 127.0.0.1:$FUNCTIONS_CUSTOMHANDLER_PORT, as
// `vmbackup serve` listens.
"use strict";
const http = require("http");

const port = Number.parseInt(process.env.FUNCTIONS_CUSTOMHANDLER_PORT || "", 10);
if (!Number.isInteger(port) || port <= 0 || port > 65535) {
  console.error("FUNCTIONS_CUSTOMHANDLER_PORT must be a TCP port");
  process.exit(2);
}

http
  .createServer((request, response) => {
    response.writeHead(200, { "content-type": "application/json" });
    response.end("{}");
  })
  .listen(port, "127.0.0.1");
