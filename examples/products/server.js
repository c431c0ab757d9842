// A products service that keeps its state in PostgreSQL and publishes its events through the
// outbox: every write and its event commit in one transaction, or neither does.
//
//   POST /products        {"sku", "name", "price"}  → 201 {"product", "event_id"}; 409 for a known sku
//   PUT  /products/{sku}  {"name"?, "price"?}       → 200 {"product", "event_id"}; 404 when unknown
//   GET  /health
//
// Configuration: DATABASE_URL (the database the relay reads), PORT (default 3001).
// Run `node server.js --help` for this text.

"use strict";

const http = require("node:http");
const { Pool } = require("pg");

if (process.argv.includes("--help")) {
  console.log(`products: a Node.js service publishing product.created / product.updated through outbox.publish

  POST /products        {"sku", "name", "price"}   201, 409 when the sku exists
  PUT  /products/{sku}  {"name"?, "price"?}        200, 404 when unknown
  GET  /health

  DATABASE_URL  PostgreSQL with the outbox schema (default postgres://postgres@127.0.0.1:5432/outbox)
  PORT          listen port on 127.0.0.1 (default 3001)`);
  process.exit(0);
}

const pool = new Pool({
  connectionString: process.env.DATABASE_URL || "postgres://postgres@127.0.0.1:5432/outbox",
  max: 4,
});

const SCHEMA = `
  create table if not exists public.products (
    sku        text primary key,
    name       text not null,
    price      numeric(12, 2) not null check (price >= 0),
    updated_at timestamptz not null default now()
  )`;

// Runs `work` in one transaction: everything it wrote, the event included, commits together.
async function inTransaction(work) {
  const client = await pool.connect();
  try {
    await client.query("begin");
    const result = await work(client);
    await client.query("commit");
    return result;
  } catch (error) {
    await client.query("rollback").catch(() => {});
    throw error;
  } finally {
    client.release();
  }
}

async function publish(client, eventType, product) {
  const { rows } = await client.query(
    "select outbox.publish(event_type => $1, key => $2, data => $3, source => 'products') as id",
    [eventType, product.sku, JSON.stringify(product)],
  );
  return rows[0].id;
}

function view(row) {
  return { sku: row.sku, name: row.name, price: Number(row.price) };
}

async function createProduct(body) {
  if (typeof body.sku !== "string" || !body.sku || typeof body.name !== "string" || typeof body.price !== "number") {
    return [422, { error: "sku and name (strings) and price (a number) are required", code: "invalid_body" }];
  }
  const product = { sku: body.sku, name: body.name, price: body.price };
  try {
    return await inTransaction(async (client) => {
      // Order inside a transaction does not matter: if the insert below fails (a known sku),
      // the event published first is rolled back with it.
      const eventId = await publish(client, "product.created", product);
      const { rows } = await client.query(
        "insert into public.products (sku, name, price) values ($1, $2, $3) returning *",
        [product.sku, product.name, product.price],
      );
      return [201, { product: view(rows[0]), event_id: eventId }];
    });
  } catch (error) {
    if (error.code === "23505") return [409, { error: `product ${product.sku} exists`, code: "conflict" }];
    if (error.code === "23514") return [422, { error: "price must not be negative", code: "invalid_price" }];
    throw error;
  }
}

async function updateProduct(sku, body) {
  return inTransaction(async (client) => {
    // The update locks the product's row, so events of one product commit (and are sent) in
    // the order of its updates.
    const { rows } = await client.query(
      `update public.products set name = coalesce($2, name), price = coalesce($3, price), updated_at = now()
        where sku = $1 returning *`,
      [sku, body.name ?? null, body.price ?? null],
    );
    if (rows.length === 0) return [404, { error: `no product ${sku}`, code: "not_found" }];
    const product = view(rows[0]);
    const eventId = await publish(client, "product.updated", product);
    return [200, { product, event_id: eventId }];
  });
}

function readJson(request) {
  return new Promise((resolve, reject) => {
    let text = "";
    request.setEncoding("utf8");
    request.on("data", (chunk) => {
      text += chunk;
      if (text.length > 65536) reject(new Error("body too large"));
    });
    request.on("end", () => {
      try {
        const value = JSON.parse(text || "{}");
        resolve(value && typeof value === "object" && !Array.isArray(value) ? value : {});
      } catch {
        reject(new Error("malformed JSON"));
      }
    });
  });
}

const server = http.createServer(async (request, response) => {
  const answer = (status, body) => {
    response.writeHead(status, { "content-type": "application/json" });
    response.end(JSON.stringify(body));
  };
  try {
    const path = new URL(request.url, "http://localhost").pathname;
    if (request.method === "GET" && path === "/health") return answer(200, { status: "ok" });
    if (request.method === "POST" && path === "/products") {
      return answer(...(await createProduct(await readJson(request))));
    }
    const match = path.match(/^\/products\/([^/]+)$/);
    if (request.method === "PUT" && match) {
      return answer(...(await updateProduct(decodeURIComponent(match[1]), await readJson(request))));
    }
    answer(404, { error: "no such route", code: "not_found" });
  } catch (error) {
    // PostgreSQL down or refusing: the caller may retry; nothing was half-written.
    console.error(JSON.stringify({ level: "ERROR", message: "request failed", error: String(error.message) }));
    answer(error.code && String(error.code).startsWith("08") ? 503 : 500, { error: String(error.message), code: "failed" });
  }
});

pool
  .query(SCHEMA)
  .then(() => {
    const port = Number(process.env.PORT || 3001);
    server.listen(port, "127.0.0.1", () => {
      console.log(JSON.stringify({ level: "INFO", message: "products listening", port }));
    });
  })
  .catch((error) => {
    console.error(JSON.stringify({ level: "ERROR", message: "cannot prepare the products table", error: error.message }));
    process.exit(1);
  });

process.on("SIGTERM", () => server.close(() => pool.end().then(() => process.exit(0))));
