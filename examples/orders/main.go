// Command orders is an orders service that keeps its state in PostgreSQL and publishes
// order.processed through the outbox: the order's update and its event commit in one
// transaction, or neither does.
//
//	POST /orders/{id}/process  {"total": 10}  → 200 {"order", "event_id"}; 422 for a negative total
//	GET  /health
//
// Configuration: DATABASE_URL (the database the relay reads), PORT (default 3002).
package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"log/slog"
	"net/http"
	"os"
	"os/signal"
	"syscall"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgxpool"
)

const schema = `
create table if not exists public.orders (
    id         text primary key,
    total      numeric(12, 2) not null check (total >= 0),
    revision   integer not null,
    updated_at timestamptz not null default now()
)`

type order struct {
	ID       string  `json:"id"`
	Total    float64 `json:"total"`
	Revision int     `json:"revision"`
}

type service struct{ db *pgxpool.Pool }

// process records one processing of an order and publishes order.processed, in one transaction.
// The upsert locks the order's row, so its events commit, and reach Kafka, in revision order.
func (s *service) process(ctx context.Context, id string, total float64) (order, string, error) {
	var o order
	var eventID string
	err := pgx.BeginFunc(ctx, s.db, func(tx pgx.Tx) error {
		err := tx.QueryRow(ctx, `
			insert into public.orders (id, total, revision) values ($1, $2, 1)
			on conflict (id) do update set total = excluded.total, revision = orders.revision + 1, updated_at = now()
			returning id, total::float8, revision`, id, total).Scan(&o.ID, &o.Total, &o.Revision)
		if err != nil {
			return err
		}
		data, _ := json.Marshal(o)
		return tx.QueryRow(ctx,
			"select outbox.publish(event_type => 'order.processed', key => $1, data => $2::jsonb, source => 'orders')",
			id, string(data)).Scan(&eventID)
	})
	return o, eventID, err
}

func answer(w http.ResponseWriter, status int, body any) {
	w.Header().Set("content-type", "application/json")
	w.WriteHeader(status)
	_ = json.NewEncoder(w).Encode(body)
}

func (s *service) handleProcess(w http.ResponseWriter, r *http.Request) {
	var body struct {
		Total *float64 `json:"total"`
	}
	if err := json.NewDecoder(http.MaxBytesReader(w, r.Body, 65536)).Decode(&body); err != nil || body.Total == nil {
		answer(w, 422, map[string]string{"error": `a body {"total": number} is required`, "code": "invalid_body"})
		return
	}
	o, eventID, err := s.process(r.Context(), r.PathValue("id"), *body.Total)
	var pgErr *pgconn.PgError
	switch {
	case errors.As(err, &pgErr) && pgErr.Code == "23514":
		// The check failed inside the transaction: neither the order nor its event exists.
		answer(w, 422, map[string]string{"error": "total must not be negative", "code": "invalid_total"})
	case err != nil:
		slog.Error("request failed", "error", err)
		answer(w, 503, map[string]string{"error": err.Error(), "code": "unavailable"})
	default:
		answer(w, 200, map[string]any{"order": o, "event_id": eventID})
	}
}

func main() {
	flag.Usage = func() {
		fmt.Fprint(os.Stderr, `orders: a Go service publishing order.processed through outbox.publish

  POST /orders/{id}/process  {"total": 10}   200, 422 for a negative total
  GET  /health

  DATABASE_URL  PostgreSQL with the outbox schema (default postgres://postgres@127.0.0.1:5432/outbox)
  PORT          listen port on 127.0.0.1 (default 3002)
`)
	}
	flag.Parse()
	slog.SetDefault(slog.New(slog.NewJSONHandler(os.Stdout, nil)))
	url := os.Getenv("DATABASE_URL")
	if url == "" {
		url = "postgres://postgres@127.0.0.1:5432/outbox"
	}
	port := os.Getenv("PORT")
	if port == "" {
		port = "3002"
	}
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, os.Interrupt)
	defer stop()
	db, err := pgxpool.New(ctx, url)
	if err != nil {
		slog.Error("bad DATABASE_URL", "error", err)
		os.Exit(1)
	}
	if _, err := db.Exec(ctx, schema); err != nil {
		slog.Error("cannot prepare the orders table", "error", err)
		os.Exit(1)
	}
	s := &service{db: db}
	mux := http.NewServeMux()
	mux.HandleFunc("POST /orders/{id}/process", s.handleProcess)
	mux.HandleFunc("GET /health", func(w http.ResponseWriter, _ *http.Request) {
		answer(w, 200, map[string]string{"status": "ok"})
	})
	server := &http.Server{Addr: "127.0.0.1:" + port, Handler: mux, ReadHeaderTimeout: 10 * time.Second}
	go func() {
		<-ctx.Done()
		shutdown, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		_ = server.Shutdown(shutdown)
	}()
	slog.Info("orders listening", "port", port)
	if err := server.ListenAndServe(); err != nil && !errors.Is(err, http.ErrServerClosed) {
		slog.Error("server failed", "error", err)
		os.Exit(1)
	}
}
