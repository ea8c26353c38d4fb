// Chat through the gateway with the official socket.io-client package, a client
// written by the Socket.IO project rather than by this repository.
//
// An operator and a manager connect with the tokens given as arguments. Each
// sends one message, then sends it again with the same client_msg_id (the
// gateway must ack the retry as a duplicate of the first), and waits until it
// has received the other's message. The script prints one JSON summary on
// stdout:
//
//   node tests/js/two_clients.mjs --url http://127.0.0.1:8000 \
//     --operator-token JWT --manager-token JWT [--timeout-ms 15000]
//
// Exit status: 0 when each side received the other's message, 1 when not (or a
// connect, ack or timeout failed), 2 for invalid arguments. socket.io-client
// comes from node_modules in the repository root (`npm ci`).

import { randomUUID } from "node:crypto";
import { createRequire } from "node:module";
import { parseArgs } from "node:util";

import { io } from "socket.io-client";

const { version } = createRequire(import.meta.url)("socket.io-client/package.json");

function readOptions() {
  const { values } = parseArgs({
    options: {
      url: { type: "string" },
      "operator-token": { type: "string" },
      "manager-token": { type: "string" },
      "timeout-ms": { type: "string", default: "15000" },
    },
  });
  const timeoutMs = Number(values["timeout-ms"]);
  const missing = ["url", "operator-token", "manager-token"].filter((name) => !values[name]);
  if (missing.length) {
    const flags = missing.map((name) => `--${name}`).join(", ");
    throw new Error(`missing ${flags}: pass the gateway URL and two tokens`);
  }
  if (!(timeoutMs > 0)) {
    const value = JSON.stringify(values["timeout-ms"]);
    throw new Error(`--timeout-ms must be a positive number of milliseconds, not ${value}`);
  }
  return {
    url: values.url,
    tokens: { operator: values["operator-token"], manager: values["manager-token"] },
    timeoutMs,
  };
}

function connect(url, role, token, timeoutMs) {
  const socket = io(url, {
    transports: ["websocket"],
    auth: { token },
    reconnection: false,
    forceNew: true,
    timeout: timeoutMs,
  });
  const participant = { role, socket, received: [] };
  socket.on("message", (message) => participant.received.push(message));
  return new Promise((resolve, reject) => {
    socket.once("connect", () => resolve(participant));
    socket.once("connect_error", (error) => {
      const code = error.data?.code ?? "connect_error";
      reject(new Error(`${role} could not connect: ${code}: ${error.message}`));
    });
  });
}

async function sendTwice(participant, timeoutMs) {
  const payload = {
    client_msg_id: randomUUID(),
    text: `hello from the ${participant.role} (socket.io-client ${version})`,
  };
  const emit = () => participant.socket.timeout(timeoutMs).emitWithAck("send_message", payload);
  participant.sent = payload;
  participant.ack = await emit();
  participant.retryAck = await emit();
}

async function waitForMessage(participant, clientMsgId, timeoutMs) {
  const deadline = Date.now() + timeoutMs;
  while (!participant.received.some((message) => message.client_msg_id === clientMsgId)) {
    if (Date.now() > deadline) return false;
    await new Promise((resolve) => setTimeout(resolve, 20));
  }
  return true;
}

function summarize(participant, other, gotOther) {
  return {
    sid: participant.socket.id,
    sent: participant.sent,
    ack: participant.ack,
    retry_ack: participant.retryAck,
    received_other: gotOther,
    received: participant.received.map(({ id, client_msg_id, sender, role, task_id }) => ({
      id,
      client_msg_id,
      sender,
      role,
      task_id,
    })),
    other_client_msg_id: other.sent.client_msg_id,
  };
}

async function main() {
  let options;
  try {
    options = readOptions();
  } catch (error) {
    console.error(`two_clients.mjs: ${error.message}`);
    return 2;
  }
  const { url, tokens, timeoutMs } = options;
  const participants = [];
  try {
    participants.push(await connect(url, "operator", tokens.operator, timeoutMs));
    participants.push(await connect(url, "manager", tokens.manager, timeoutMs));
    const [operator, manager] = participants;
    await Promise.all(participants.map((participant) => sendTwice(participant, timeoutMs)));

    const operatorGot = await waitForMessage(operator, manager.sent.client_msg_id, timeoutMs);
    const managerGot = await waitForMessage(manager, operator.sent.client_msg_id, timeoutMs);
    const summary = {
      ok: operatorGot && managerGot,
      socket_io_client: version,
      operator: summarize(operator, manager, operatorGot),
      manager: summarize(manager, operator, managerGot),
    };
    console.log(JSON.stringify(summary));
    return summary.ok ? 0 : 1;
  } catch (error) {
    console.log(JSON.stringify({ ok: false, socket_io_client: version, error: error.message }));
    return 1;
  } finally {
    participants.forEach((participant) => participant.socket.close());
  }
}

process.exitCode = await main();
