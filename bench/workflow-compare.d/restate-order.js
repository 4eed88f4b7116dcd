// The order chain as a Restate service, for bench/workflow-compare: the same three calls as
// meshflow's bench workflow (reserve → charge → ship), each one durable `ctx.run` doing an HTTP
// POST to a meshflow-shop service with the Idempotency-Key `<invocation id>/<step>`.
//   node restate-order.js <inventory URL> <payment URL> <shipping URL>
// Prints `LISTENING <port>` once its HTTP/2 endpoint listens (port chosen by the kernel).
// The SDK calls Promise.withResolvers (Node.js 22); the standard polyfill on Node.js 20.
if (!Promise.withResolvers) {
  Promise.withResolvers = function withResolvers() {
    let resolve, reject;
    const promise = new this((res, rej) => { resolve = res; reject = rej; });
    return { promise, resolve, reject };
  };
}
const http2 = require("node:http2");
const restate = require("@restatedev/restate-sdk");

const [inventory, payment, shipping] = process.argv.slice(2);
if (!shipping) {
  console.error("usage: restate-order.js <inventory URL> <payment URL> <shipping URL>");
  process.exit(64);
}

async function post(url, body, key) {
  const response = await fetch(url, {
    method: "POST",
    headers: { "content-type": "application/json", "idempotency-key": key },
    body: JSON.stringify(body),
  });
  const text = await response.text();
  // 5xx: retried by Restate (the same key); 4xx: the step failed for good.
  if (response.status >= 500) throw new Error(`${url}: ${response.status} ${text}`);
  if (response.status >= 400) throw new restate.TerminalError(`${url}: ${response.status} ${text}`);
  return JSON.parse(text);
}

const order = restate.service({
  name: "order",
  handlers: {
    place: async (ctx, input) => {
      const id = ctx.request().id;
      const reservation = await ctx.run("reserve", () =>
        post(`${inventory}/reservations`, { sku: input.sku, qty: input.qty }, `${id}/reserve`));
      const charge = await ctx.run("charge", () =>
        post(`${payment}/charges`,
          { customer: input.customer, amount: input.amount, delayMs: input.delayMs },
          `${id}/charge`));
      const shipment = await ctx.run("ship", () =>
        post(`${shipping}/shipments`, { order: id, address: input.address }, `${id}/ship`));
      return { reservation: reservation.id, charge: charge.id, shipment: shipment.id };
    },
  },
});

// HTTP/2 (what Restate's deployment discovery expects), on 127.0.0.1 only.
const server = http2.createServer(restate.createEndpointHandler({ services: [order] }));
server.listen(0, "127.0.0.1", () => console.log(`LISTENING ${server.address().port}`));
