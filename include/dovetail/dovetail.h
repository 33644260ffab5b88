/* dovetail.h: the C API of the dovetail-ext native core (libdovetail).
 *
 * A LLaMA target engine, a Dovetail (DGF) draft engine and greedy speculative decoding
 * steps over the two, on the CPU, usable from C99 and C++ without Python. What it is not: a model loader or a tokenizer. The caller reads the
 * weights (GGUF-style names and block layouts, see dt_weight) and hands over buffers; the
 * Python package writes a simple container for them (python -m dovetail_ext.export_c_weights).
 *
 * Legend: T tokens in one call, V vocabulary size, D hidden size, H query heads, KV
 * key/value heads, Dh head dim, F FFN size, P scratch rows the draft already holds (tree
 * expansion).
 *
 * Errors. Every function that can fail returns a dt_status. DT_OK is 0. On failure
 * dt_last_error() gives a message naming the problem, and the engine is as it was: every
 * argument is checked before any state changes. No C++ exception crosses this boundary.
 *
 * Ownership.
 *   - Weight buffers are copied (repacked) during dt_target_create / dt_draft_create: the
 *     caller may free or unmap them as soon as the call returns.
 *   - Handles are owned by the caller and released with dt_target_destroy /
 *     dt_draft_destroy (NULL is accepted and ignored).
 *   - A draft holds shared references to its target's token embedding and LM head, so a
 *     draft may outlive the target handle it was created from.
 *   - Input and output arrays are the caller's; the library keeps no pointer to them after
 *     a call returns. Output arrays must have the sizes stated at each function.
 *   - The string from dt_last_error() and dt_version_string() belongs to the library.
 *
 * Threads. A handle may be used from several threads: calls on one handle are serialized
 * (each holds the handle's lock for its whole duration). Distinct handles are independent
 * and may run at the same time, a draft next to its own target included. Each engine
 * computes with its own worker threads (dt_*_config.threads).
 */
#ifndef DOVETAIL_DOVETAIL_H
#define DOVETAIL_DOVETAIL_H

#include <stddef.h>
#include <stdint.h>

/* Package version this header belongs to. */
#define DT_VERSION_MAJOR 0
#define DT_VERSION_MINOR 1
#define DT_VERSION_PATCH 0
#define DT_VERSION_STRING "0.1.0"
/* One number for compile-time checks: 10000 * major + 100 * minor + patch. */
#define DT_VERSION (DT_VERSION_MAJOR * 10000 + DT_VERSION_MINOR * 100 + DT_VERSION_PATCH)

#if defined(_WIN32)
#  if defined(DOVETAIL_BUILDING_LIBRARY)
#    define DT_API __declspec(dllexport)
#  else
#    define DT_API __declspec(dllimport)
#  endif
#elif defined(__GNUC__)
#  define DT_API __attribute__((visibility("default")))
#else
#  define DT_API
#endif

/* C++ callers see that no function throws. */
#if defined(__cplusplus)
#  define DT_NOEXCEPT noexcept
#else
#  define DT_NOEXCEPT
#endif

#ifdef __cplusplus
extern "C" {
#endif

/* ---- status, version ------------------------------------------------------------------ */

typedef enum dt_status {
  DT_OK = 0,
  DT_ERR_NULL = 1,        /* a required handle or pointer is NULL */
  DT_ERR_INVALID = 2,     /* bad argument: dtype, shape, byte size, config, token id, ancestors, full context */
  DT_ERR_RANGE = 3,       /* an index (row, length) outside its range */
  DT_ERR_NO_MEMORY = 4,   /* an allocation failed */
  DT_ERR_INTERNAL = 5     /* anything else (a bug: please report it with the message) */
} dt_status;

/* The message of the most recent failed call on the calling thread ("" when none).
 * Successful calls leave it unchanged. Valid until the next failing call on this thread. */
DT_API const char* dt_last_error(void) DT_NOEXCEPT;

/* A short name for a status ("DT_ERR_INVALID", ...); never NULL. */
DT_API const char* dt_status_name(dt_status status) DT_NOEXCEPT;

/* The library's version as "MAJOR.MINOR.PATCH"; the integers may be NULL. A program built
 * against this header should check that the major number equals DT_VERSION_MAJOR. */
DT_API const char* dt_version_string(int* major, int* minor, int* patch) DT_NOEXCEPT;

/* ---- weights --------------------------------------------------------------------------- */

/* Storage types. Quantized types hold blocks of 32 values laid out as in GGUF:
 *   DT_Q8_0: f16 d, int8 q[32]           value = q * d              (34 bytes per block)
 *   DT_Q4_0: f16 d, u8 nibbles[16]       value = (nibble - 8) * d   (18 bytes per block)
 *   DT_Q4_1: f16 d, f16 m, u8 nib[16]    value = nibble * d + m     (20 bytes per block)
 * Low nibbles hold elements 0..15 of a block, high nibbles elements 16..31. DT_BF16 is the
 * upper half of an IEEE float32; DT_F16 is IEEE half. Values are little-endian. */
typedef enum dt_dtype {
  DT_F32 = 0,
  DT_F16 = 1,
  DT_BF16 = 2,
  DT_Q8_0 = 3,
  DT_Q4_0 = 4,
  DT_Q4_1 = 5
} dt_dtype;

/* One named tensor. Matrices are [rows = out_features, cols = in_features], rows stored
 * contiguously (a quantized row is cols / 32 blocks); vectors (the RMSNorm weights) are
 * 1-D and must be DT_F32. `nbytes` must be exactly the size the shape and dtype imply.
 * `data` may have any alignment.
 *
 * Target names (GGUF-style, query/key rows in the rotate-half RoPE layout of Hugging Face
 * LLaMA, i.e. *not* llama.cpp's interleaved one):
 *   token_embd [V, D], output [V, D] (optional: the LM head is tied to token_embd without
 *   it), output_norm [D], and for each layer i: blk.i.attn_norm [D], blk.i.attn_q [H*Dh, D],
 *   blk.i.attn_k [KV*Dh, D], blk.i.attn_v [KV*Dh, D], blk.i.attn_output [D, H*Dh],
 *   blk.i.ffn_norm [D], blk.i.ffn_gate [F, D], blk.i.ffn_up [F, D], blk.i.ffn_down [D, F];
 *   for Qwen2 models also blk.i.attn_q.bias [H*Dh], blk.i.attn_k.bias [KV*Dh] and
 *   blk.i.attn_v.bias [KV*Dh] (f32): given for layer 0, they are required for every layer;
 *   for Qwen3 models blk.i.attn_q_norm [Dh] and blk.i.attn_k_norm [Dh] (f32), the same way;
 *   for Gemma 3 models these q/k norms and blk.i.post_attention_norm [D] and
 *   blk.i.post_ffw_norm [D] (f32, stored as 1 + w as in GGUF files), the same way, with the
 *   config's Gemma fields set;
 *   for LLaMA 3.1+ or linear RoPE scaling rope_freqs [Dh/2] (f32): the frequencies' divisors.
 * Draft names: fuse.e_norm [D], fuse.w1 [D, D], fuse.w2 [D, D], fuse.wz [D, 2D], and the
 *   layer names above (blk.0 without attn_norm). Unknown names are ignored. */
typedef struct dt_weight {
  const char* name;   /* NUL-terminated */
  int32_t dtype;      /* a dt_dtype */
  int32_t ndim;       /* 1 or 2 */
  int64_t shape[4];   /* the first ndim entries are used */
  const void* data;
  uint64_t nbytes;
} dt_weight;

typedef enum dt_kv_dtype { DT_KV_F32 = 0, DT_KV_BF16 = 1 } dt_kv_dtype;

/* ---- target engine --------------------------------------------------------------------- */

typedef struct dt_target dt_target;

/* Model shape and engine options. Fill it with dt_target_config_init first (it sets
 * struct_size and the defaults), then set the model's fields. */
typedef struct dt_target_config {
  uint32_t struct_size; /* sizeof(dt_target_config), set by dt_target_config_init */
  int64_t vocab_size, hidden_size, intermediate_size, num_layers, num_heads, num_kv_heads, head_dim;
  float rope_theta;     /* default 10000 */
  float rms_norm_eps;   /* default 1e-5 */
  int64_t context;      /* KV slots: committed tokens plus one batch (default 2048) */
  int64_t max_batch;    /* most tokens in one forward (default 128) */
  int32_t threads;      /* worker threads, >= 1 (default 1) */
  int32_t kv_dtype;     /* a dt_kv_dtype (default DT_KV_F32) */
  /* Gemma 3 (all zero otherwise, the default): */
  int32_t activation;        /* the FFN gate: a dt_activation (default DT_ACT_SILU) */
  int32_t scale_embeddings;  /* nonzero: token embeddings are multiplied by sqrt(hidden_size) */
  int64_t sliding_window;    /* > 0: local layers see only the keys of the last sliding_window positions */
  int64_t sliding_window_pattern; /* layer i is global when (i + 1) % pattern == 0 (0: all local) */
  float rope_theta_local;    /* the local layers' RoPE base (0: rope_theta); they take no rope_freqs */
  /* LongRoPE (Phi-3 128k, Phi-3.5; 0 otherwise, the default): */
  float rope_attn_factor;    /* RoPE's cos and sin times it, every q . k times its square (0: 1) */
  /* Gemma 2 and the Gemma 27B models (0 otherwise, the default): */
  float query_pre_attn_scalar;   /* scores scaled by its -1/2 power (0: head_dim's) */
  float attn_logit_softcapping;  /* scaled scores soft-capped, cap tanh(s / cap) (0: none) */
  float final_logit_softcapping; /* logits soft-capped likewise (0: none) */
  /* SmolLM3 (0 otherwise, the default): */
  int64_t nope_interval;         /* layer i rotates no q / k when (i + 1) % nope_interval == 0 (0: none) */
} dt_target_config;

typedef enum dt_activation { DT_ACT_SILU = 0, DT_ACT_GELU_TANH = 1 } dt_activation;

/* Zeroes *cfg and sets struct_size and the defaults. */
DT_API void dt_target_config_init(dt_target_config* cfg) DT_NOEXCEPT;

/* Builds a target engine; *out receives the handle (NULL on failure). Every weight the
 * config implies must be present with its exact shape. */
DT_API dt_status dt_target_create(const dt_target_config* cfg, const dt_weight* weights, size_t n_weights,
                                  dt_target** out) DT_NOEXCEPT;

/* Runs T new tokens after the committed prefix.
 *   tokens     [T] ids in [0, V)
 *   positions  [T] RoPE positions in [0, context), or NULL for n_past + 0..T-1
 *   ancestors  [T, T] row-major bytes, 0 or 1: ancestors[t*T + j] = 1 lets token t attend
 *              to batch token j (j <= t, the diagonal set); NULL means causal. Every token
 *              also sees the whole committed prefix.
 *   logit_rows [n_logit_rows] batch rows whose logits to compute -> logits [n_logit_rows, V]
 *   feature_rows [n_feature_rows] batch rows whose final-norm hidden states (the LM head's
 *              input) to return -> features [n_feature_rows, D]
 * Either row list may be empty (n = 0; the pointers may then be NULL). Results are bitwise
 * independent of how tokens are batched. The rows' K/V stay pending until a commit; the
 * next forward drops pending rows that were not committed. */
DT_API dt_status dt_target_forward(dt_target* target, const int32_t* tokens, const int32_t* positions,
                                   int64_t n_tokens, const uint8_t* ancestors,
                                   const int64_t* logit_rows, int64_t n_logit_rows, float* logits,
                                   const int64_t* feature_rows, int64_t n_feature_rows, float* features) DT_NOEXCEPT;

/* Keeps rows `kept` (strictly increasing) of the last forward in the KV cache, compacted
 * after the committed prefix. kept = NULL with n_kept = 0 keeps every row of the last
 * forward. */
DT_API dt_status dt_target_commit(dt_target* target, const int64_t* kept, int64_t n_kept) DT_NOEXCEPT;

/* Forgets committed tokens past n (0 <= n <= n_past); n = 0 resets the conversation. */
DT_API dt_status dt_target_truncate(dt_target* target, int64_t n) DT_NOEXCEPT;

/* Committed tokens; pending rows of the last forward (not yet committed). */
DT_API dt_status dt_target_n_past(dt_target* target, int64_t* out) DT_NOEXCEPT;
DT_API dt_status dt_target_pending(dt_target* target, int64_t* out) DT_NOEXCEPT;

/* Worker threads for the next forward (1..1024). */
DT_API dt_status dt_target_set_threads(dt_target* target, int32_t threads) DT_NOEXCEPT;

DT_API void dt_target_destroy(dt_target* target) DT_NOEXCEPT;

/* ---- draft engine (CPU) ---------------------------------------------------------------- */

typedef struct dt_draft dt_draft;

/* The draft's layer shape and engine options; hidden_size must equal the target's. Fill
 * it with dt_draft_config_init first. */
typedef struct dt_draft_config {
  uint32_t struct_size; /* sizeof(dt_draft_config), set by dt_draft_config_init */
  int64_t hidden_size, intermediate_size, num_layers, num_heads, num_kv_heads, head_dim;
  float rope_theta;
  float rms_norm_eps;
  int64_t context;      /* KV slots: committed rows plus the scratch rows of one tree */
  int64_t max_batch;    /* most scratch rows at once */
  int32_t threads;
  int32_t kv_dtype;
} dt_draft_config;

DT_API void dt_draft_config_init(dt_draft_config* cfg) DT_NOEXCEPT;

/* Builds a draft that shares `target`'s token embedding and LM head (see Ownership).
 * vocab_map [n_vocab_map]: an optional reduced draft vocabulary, strictly ascending target
 * token ids in [0, V) that the draft may propose (its head keeps a copy of just those rows
 * of the target's LM head; top-k ids are still returned as target ids). NULL with
 * n_vocab_map = 0 for the full vocabulary. The map is copied. */
DT_API dt_status dt_draft_create(const dt_target* target, const dt_draft_config* cfg, const dt_weight* weights,
                                 size_t n_weights, const int32_t* vocab_map, int64_t n_vocab_map,
                                 dt_draft** out) DT_NOEXCEPT;

/* One draft call over T pairs (f_j, x_{j+1}).
 *   features   [T, D] target features f_j (finite)
 *   tokens     [T] next tokens x_{j+1}; positions [T] (NULL: n_past + 0..T-1)
 *   append     0: drop earlier scratch rows first (P = 0); 1: add after the P scratch rows
 *              kept since the last commit (tree expansion; P from dt_draft_pending)
 *   ancestors  [T, P + T] row-major 0/1 bytes over the scratch rows (row t must set column
 *              P + t and nothing right of it); NULL means causal within this batch.
 *   hidden     [T, D] output: the predicted next features
 *   topk_rows  [n_topk_rows] batch rows to score -> topk_ids [n_topk_rows, k] and
 *              topk_logprobs [n_topk_rows, k], most likely first (k in 1..256, and at most
 *              the draft's vocabulary); ids are target token ids */
DT_API dt_status dt_draft_forward(dt_draft* draft, const float* features, const int32_t* tokens,
                                  const int32_t* positions, int64_t n_tokens, const uint8_t* ancestors,
                                  int append, float* hidden, const int64_t* topk_rows, int64_t n_topk_rows,
                                  int64_t k, int32_t* topk_ids, float* topk_logprobs) DT_NOEXCEPT;

/* As dt_target_commit / dt_target_truncate, over the draft's scratch rows and KV cache. */
DT_API dt_status dt_draft_commit(dt_draft* draft, const int64_t* kept, int64_t n_kept) DT_NOEXCEPT;
DT_API dt_status dt_draft_truncate(dt_draft* draft, int64_t n) DT_NOEXCEPT;
DT_API dt_status dt_draft_n_past(dt_draft* draft, int64_t* out) DT_NOEXCEPT;
DT_API dt_status dt_draft_pending(dt_draft* draft, int64_t* out) DT_NOEXCEPT;
DT_API dt_status dt_draft_set_threads(dt_draft* draft, int32_t threads) DT_NOEXCEPT;
DT_API void dt_draft_destroy(dt_draft* draft) DT_NOEXCEPT;

/* ---- greedy speculative decoding ------------------------------------------------------- */

/* A speculator drives a target and a draft built from it through whole greedy steps:
 *   1. the draft takes the pairs (f_j, x_{j+1}) of the positions the last step committed;
 *   2. it grows an EAGLE-2 tree rooted at the last of those tokens (top_k candidates kept
 *      per level, at most `depth` levels, the total_tokens - 1 most likely nodes kept);
 *   3. the target verifies the tree in one call and keeps the longest path whose tokens
 *      are its own argmax, plus its argmax after it (the bonus token).
 * The emitted tokens are exactly the target's greedy continuation.
 *
 * Decoding loop, after the prompt's forward and commit on the target (features of every
 * prompt row requested) and its first greedy token x:
 *   features = prompt features [n, D], next_tokens = prompt[1:] + [x]   (n = prompt length)
 *   repeat: dt_speculator_step(...) -> emitted [m], emitted_features [m, D];
 *           output `emitted`; then features = emitted_features, next_tokens = emitted.
 *
 * The speculator keeps both engines alive (their handles may be destroyed first). Between
 * steps the target and draft handles may be used directly (truncate both to restart), but
 * not during a step. */
typedef struct dt_speculator dt_speculator;

/* Fill it with dt_tree_shape_init first (defaults, those of the Python TreeParams: top_k 2,
 * depth 1, total_tokens 3, min_prob 0.1). */
typedef struct dt_tree_shape {
  uint32_t struct_size; /* sizeof(dt_tree_shape), set by dt_tree_shape_init */
  int64_t top_k;        /* candidates kept per level, 1..256 (and at most the draft's vocabulary) */
  int64_t depth;        /* drafted levels, >= 1 */
  int64_t total_tokens; /* tree nodes with the root, 2..the target's max_batch */
  double min_prob;      /* drop nodes whose path probability under the draft is below it, [0, 1) */
} dt_tree_shape;

DT_API void dt_tree_shape_init(dt_tree_shape* shape) DT_NOEXCEPT;

/* `draft` must have been created from `target`. */
DT_API dt_status dt_speculator_create(dt_target* target, dt_draft* draft, dt_speculator** out) DT_NOEXCEPT;

/* One step.
 *   features          [n, D] target features of the n positions committed last (finite)
 *   next_tokens       [n] the token after each of them; next_tokens[n - 1] is the root
 *   emitted           output, room for depth + 1 tokens (with prompt lookup on,
 *                     max(depth, max_tokens) + 1): the accepted drafted tokens, then the
 *                     bonus token
 *   emitted_features  output [that many, D] (or NULL): target features of the committed
 *                     rows (the root, then each accepted token), the next step's features
 *   n_emitted         output: the number of emitted tokens
 * The target needs total_tokens free KV slots, and the draft room for the n pairs (with
 * those held back by lookup steps) and top_k x (depth - 1) scratch rows; near the end of
 * a context, decode the last tokens plainly. A refused step changes nothing. */
DT_API dt_status dt_speculator_step(dt_speculator* spec, const float* features, const int32_t* next_tokens,
                                    int64_t n, const dt_tree_shape* shape, int32_t* emitted,
                                    float* emitted_features, int64_t* n_emitted) DT_NOEXCEPT;
DT_API void dt_speculator_destroy(dt_speculator* spec) DT_NOEXCEPT;

/* Prompt lookup in dt_speculator_step (off unless set). The tokens passed as next_tokens
 * form the context; when its last tokens (max_n down to min_n of them) occurred before,
 * the step verifies the up to max_tokens tokens that followed their latest occurrence
 * instead of a drafted tree, with the same acceptance, so the output is unchanged. The
 * draft does not run in such a step: the speculator holds that step's pairs back and feeds
 * them to the draft before the next drafting step's (the decoding loop stays as above).
 * A target whose n_past is not where the last step left it starts a new context;
 * dt_speculator_reset does so at once. Fill the struct with dt_lookup_params_init first
 * (defaults: min_n 3, max_n 4, max_tokens 6). */
typedef struct dt_lookup_params {
  uint32_t struct_size; /* sizeof(dt_lookup_params), set by dt_lookup_params_init */
  int64_t min_n;        /* shortest suffix matched, >= 1 */
  int64_t max_n;        /* longest suffix matched, min_n .. 64 */
  int64_t max_tokens;   /* the longest chain verified, >= 1 and below the target's max_batch */
} dt_lookup_params;

DT_API void dt_lookup_params_init(dt_lookup_params* params) DT_NOEXCEPT;
/* `params` NULL turns lookup off. Either way the context and held pairs are dropped. */
DT_API dt_status dt_speculator_set_lookup(dt_speculator* spec, const dt_lookup_params* params) DT_NOEXCEPT;
DT_API dt_status dt_speculator_reset(dt_speculator* spec) DT_NOEXCEPT;

/* Corpus lookup: where the context has no match, a lookup step verifies the chain that
 * most occurrences of the context's longest matching suffix went on with in a fixed body
 * of tokens (typically the target's own replies: dovetail build-corpus writes one; its
 * "tokens" tensor is what to pass). A chain grows while at least min_count occurrences,
 * and at least min_frac of those that go on, agree on the next token. It needs prompt
 * lookup on (dt_speculator_set_lookup); the corpus stays across set_lookup and reset.
 * The tokens are copied and indexed (0.16 s for 1.3M tokens on a 2-core CPU). Fill the struct
 * with dt_corpus_params_init first (defaults: min_n 3, max_n 6, max_tokens 4, min_count 4,
 * min_frac 0.7). */
typedef struct dt_corpus_params {
  uint32_t struct_size; /* sizeof(dt_corpus_params), set by dt_corpus_params_init */
  int64_t min_n;        /* shortest suffix matched, >= 1 */
  int64_t max_n;        /* longest suffix matched, min_n .. 64 */
  int64_t max_tokens;   /* the longest corpus chain, 1 .. 64 (and at most the lookup's) */
  int64_t min_count;    /* occurrences that must agree, >= 1 */
  double min_frac;      /* share of the occurrences going on that must agree, 0 .. 1 */
} dt_corpus_params;

DT_API void dt_corpus_params_init(dt_corpus_params* params) DT_NOEXCEPT;
/* `tokens` NULL (n 0) removes the corpus; token ids must be >= 0. */
DT_API dt_status dt_speculator_set_corpus(dt_speculator* spec, const int32_t* tokens, int64_t n,
                                          const dt_corpus_params* params) DT_NOEXCEPT;

#ifdef __cplusplus
} /* extern "C" */
#endif

#endif /* DOVETAIL_DOVETAIL_H */
