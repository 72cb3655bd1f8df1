"""Every bound in the system, named, with its unit last.

A limit is checked at the boundary (rejected with a clear error) and inside (``invariant``).
Settings may lower or raise the ones marked configurable; the rest are protocol constants.
"""

from __future__ import annotations

# --- client API boundary -------------------------------------------------------------------
request_body_bytes_max = 1_000_000
# A body over the limit is still read (and dropped) before the 413 goes out, up to these: a client
# that sends its whole body before it reads (Python's urllib) otherwise sees a reset, not the 413.
# Past them the 413 goes out with the connection closed.
request_body_drain_bytes_max = 32 * 1024 * 1024
request_body_drain_s_max = 10.0
messages_per_request_max = 256
message_chars_max = 200_000
stop_sequences_max = 4
stop_sequence_chars_max = 256
completion_tokens_max = 8192  # whatever the model's context allows, never more than this
n_choices_max = 8  # choices of one request (n, or best_of), each its own job
prompts_per_request_max = 16  # prompts of one /v1/completions request
choices_per_request_max = 16  # prompts x best_of (or n): the jobs one request may start
top_logprobs_max = 20  # alternatives per token (OpenAI: 20; completions' logprobs too)
logit_bias_entries_max = 300  # OpenAI's limit
repetition_penalty_max = 10.0
top_k_max = 100_000
# Structured outputs and tools (coordinator checks, node compiles; llguidance)
json_schema_bytes_max = 64_000  # a response_format schema, as compact JSON
json_schema_depth_max = 32  # nesting of objects and arrays in a schema
tools_per_request_max = 64
tool_schema_bytes_max = 64_000  # all tool definitions together, as compact JSON
grammar_bytes_max = 256_000  # the compiled-to-llguidance grammar carried in a job
grammar_compile_s_max = 2.0  # a grammar the coordinator cannot compile in this is refused

# --- waiting and placement -----------------------------------------------------------------
jobs_waiting_max = 10_000
placement_wait_s_max = 10.0  # a job no node can take within this is answered 503
job_attempts_max = 4  # first placement plus resumptions after nodes left
token_gap_s_max = 60.0  # a node silent this long on a job it holds is treated as gone
first_token_grace_s_max = 600.0  # the most a prefill adds to it before the first token
job_total_s_max = 3600.0

# --- node protocol -------------------------------------------------------------------------
ws_message_bytes_max = 1_000_000
node_hello_timeout_s = 10.0
heartbeat_interval_s = 5.0
heartbeat_timeout_s = 20.0
jobs_per_node_max = 64
tokens_per_message_max = 256
models_per_node_max = 32
node_reconnect_backoff_s_max = 30.0

# --- chains: a model split over several nodes (coordinator/chains.py) -----------------------
# One activation message's tensor, raw bytes: its base64 (4/3 of it) plus the JSON around it
# stays under ws_message_bytes_max; a longer prompt is prefilled in chunks of this size.
activation_bytes_max = 512 * 1024
activation_positions_max = 4096  # rows of one activation tensor, whatever their width
activation_hidden_max = 65_536  # columns (the model's hidden size)
chain_stages_max = 16  # stages of one chain
# How much faster a chain must be predicted to decode than the best whole-model node before a
# job that a whole-model node could serve goes to the chain instead (``chains_when_faster``): the
# roofline ignores what a chain risks and a whole node does not (a departure of any of its nodes
# costs a repair; each hop's real round trip varies), so a chain only as fast on paper is not
# worth it. 1.2: its predicted tokens per second at least 20 % above the whole node's.
chain_speedup_min_default = 1.2
stage_step_s_max = 30.0  # a stage silent this long on one step is replaced like one that left
stage_repairs_max = 4  # stage replacements of one job before it fails
stage_idle_s_max = 600.0  # a node drops a sequence's cache unused for this long

# --- the bus between replicas (coordinator/replication/) -------------------------------------
# The most one bus message may hold: NATS's default max_payload (1 MiB). A node's frame relayed
# between replicas travels as a small header plus the frame's own bytes (never re-escaped), so
# the largest frame a node may send or be sent (ws_message_bytes_max) fits with room to spare;
# an activation (activation_bytes_max, 4/3 of it as base64) fits either way.
bus_message_bytes_max = 1024 * 1024
bus_header_bytes_max = 1024  # the header before a relayed frame (replica, node, kind)
stage_relays_max = 4096  # stage sequences one host replica relays for other replicas at once

# --- disaggregated prefill/decode: a KV cache handed from one node to another ---------------
# (coordinator/handoff.py). The sender's cache goes to the coordinator in chunks of one layer's
# keys and values over a range of positions, each chunk's raw bytes at most kv_chunk_bytes_max
# (its base64 and JSON stay under ws_message_bytes_max), the whole cache at most
# kv_handoff_bytes_max (the coordinator holds it until the receiver has it) in at most
# kv_chunks_max chunks (they queue on the receiver's socket, bounded at 1024 messages).
kv_chunk_bytes_max = 512 * 1024
kv_handoff_bytes_max = 64 * 1024 * 1024
kv_chunks_max = 512
kv_layers_max = 512
kv_heads_max = 1024
kv_head_dim_max = 1024
# the receiver waits this long for every chunk it was promised, then prefills the prompt itself
kv_handoff_s_max = 30.0

# --- verification (trust/decisions.py, coordinator/verification.py) -------------------------------
score_tokens_max = 2048  # claimed tokens scored in one teacher-forced pass (the first ones)
verifications_running_max = 4  # checks in flight at once on one coordinator
verifications_waiting_max = 256  # selected checks waiting for a verifier; more are dropped
verification_timeout_s = 60.0  # a verifier silent this long fails the check as inconclusive
# chain jobs' checks waiting: each holds the activations its stages received and returned
chain_checks_waiting_max = 16

# --- client keys (coordinator/ratelimit.py, coordinator/admission.py) -----------------------------
streams_per_key_max = 64  # requests in flight at once per key, unless its policy says fewer
requests_per_minute_max = 100_000  # the most an admin may grant one key

# --- node engine ---------------------------------------------------------------------------
batch_size_max = 16
engine_queue_max = 256


# --- metering from nodes (trust/decisions.py check_metering_bounds) -------------------------
# A node's report is untrusted: busy time at most the attempt's wall time as the coordinator
# saw it (send of the assignment to receipt of the result) plus this slack for timer
# granularity; energy at most the device class's most power times the busy time.
metering_wall_slack_s = 0.5
# The most a device of each class can draw (W): a generous ceiling, not an estimate (an
# 8-GPU server under full load draws ~10 kW). A class not listed gets the default.
device_power_w_max = {
    "laptop": 300,
    "car": 500,
    "desktop": 1_000,
    "gaming-pc": 1_500,
    "server": 3_000,
    "datacenter-gpu": 12_000,
}
device_power_w_max_default = 1_500

# --- ledger (ledger/engine.py, store/ledger_tables.py) ---------------------------------------
# The most any account's running total (debits or credits, posted or pending) may reach:
# 2^62 micro-units (4.6 trillion units of the currency), half of BIGINT, so that a total plus
# one more transfer (at most pricing.amount_micros_max) never overflows 64 bits. SQLite turned
# an overflowing integer into a float silently; a CHECK constraint now refuses it on both
# databases and the transaction fails with Conflict(code="ledger_total_max").
ledger_total_micros_max = 2**62

# --- payouts (ledger/payouts.py) -------------------------------------------------------------
# A run's claim on a payout batch: another run takes the batch over only after this long (the
# claimant died between claiming and paying); writing a batch's file takes seconds.
payout_claim_s_max = 300.0
# An owner's receivable (earned balance below zero: a withhold after the earning was paid out)
# that no later earning netted within this long is written off at the next payout run, to
# cost:opex:owner_receivables_written_off (the cost report shows it).
owner_receivable_s_max = 180 * 86_400.0
