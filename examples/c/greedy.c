/* greedy.c: greedy decoding through the dovetail C API, without Python; with a draft
 * (-d), greedy speculative decoding (dt_speculator_step, with prompt lookup unless -l 0,
 * and corpus lookup with -c), which prints the same ids.
 *
 * Reads the weight containers written by `python -m dovetail_ext.export_c_weights FILE
 * [--draft-out DRAFT_FILE] [--corpus-out CORPUS_FILE]` (layout in
 * python/dovetail_ext/capi.py), builds a target engine (and a draft, a speculator and its
 * corpus), runs the prompt token ids and prints the greedy
 * continuation's ids on one line, stopping early at an end-of-sequence id (which is not
 * printed). No tokenizer: ids in, ids out.
 *
 *   greedy [-t THREADS] [-d DRAFT] [-l 0|1] [-c CORPUS] WEIGHTS N_NEW ID [ID ...]
 *
 * Build (C99, or as C++):
 *   INC=$(python -c 'import dovetail_ext; print(dovetail_ext.get_include())')
 *   LIB=$(python -c 'import dovetail_ext; print(dovetail_ext.get_library().parent)')
 *   cc -std=c99 -O2 examples/c/greedy.c -I"$INC" -L"$LIB" -Wl,-rpath,"$LIB" -ldovetail -o greedy
 */
#include <dovetail/dovetail.h>

#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define MAX_EOS 8
#define VOCAB_MAP_CODE 32 /* the container's int32 ids: a draft's vocab_map, a corpus (not a dt_dtype) */

typedef struct {
  unsigned char* bytes; /* the whole file */
  size_t size;
  dt_target_config cfg;
  int32_t eos[MAX_EOS];
  uint32_t n_eos;
  dt_weight* weights;
  char* names; /* NUL-terminated copies of the tensor names */
  uint32_t n_weights;
} container;

/* Little-endian reads with bounds checks; *ok turns 0 on a short file. */
static uint64_t read_le(const container* c, size_t* at, unsigned n, int* ok) {
  uint64_t v = 0;
  unsigned i;
  if (*at > c->size || c->size - *at < n) {
    *ok = 0;
    return 0;
  }
  for (i = 0; i < n; ++i) v |= (uint64_t)c->bytes[*at + i] << (8 * i);
  *at += n;
  return v;
}

static float read_f32(const container* c, size_t* at, int* ok) {
  uint32_t bits = (uint32_t)read_le(c, at, 4, ok);
  float f;
  memcpy(&f, &bits, sizeof f);
  return f;
}

static int fail_format(const char* path, const char* what) {
  fprintf(stderr, "greedy: %s: not a valid weight container (%s)\n", path, what);
  return 0;
}

/* Loads and parses the container; returns 0 (with a message) on failure. */
static int load_container(const char* path, container* c) {
  FILE* f = fopen(path, "rb");
  long size;
  size_t at = 0, data_offset, names_len = 0, names_at = 0;
  uint32_t i, version;
  int ok = 1;
  memset(c, 0, sizeof *c);
  if (!f) {
    perror(path);
    return 0;
  }
  if (fseek(f, 0, SEEK_END) != 0 || (size = ftell(f)) < 0 || fseek(f, 0, SEEK_SET) != 0) {
    perror(path);
    fclose(f);
    return 0;
  }
  c->size = (size_t)size;
  c->bytes = (unsigned char*)malloc(c->size ? c->size : 1);
  if (!c->bytes || fread(c->bytes, 1, c->size, f) != c->size) {
    fprintf(stderr, "greedy: cannot read %s\n", path);
    fclose(f);
    return 0;
  }
  fclose(f);

  if (c->size < 136 || memcmp(c->bytes, "DTWEIGHT", 8) != 0) return fail_format(path, "bad magic");
  at = 8;
  version = (uint32_t)read_le(c, &at, 4, &ok);
  if (version < 1 || version > 3) return fail_format(path, "unsupported format version");
  c->n_weights = (uint32_t)read_le(c, &at, 4, &ok);
  data_offset = (size_t)read_le(c, &at, 8, &ok);
  dt_target_config_init(&c->cfg);
  c->cfg.vocab_size = (int64_t)read_le(c, &at, 8, &ok);
  c->cfg.hidden_size = (int64_t)read_le(c, &at, 8, &ok);
  c->cfg.intermediate_size = (int64_t)read_le(c, &at, 8, &ok);
  c->cfg.num_layers = (int64_t)read_le(c, &at, 8, &ok);
  c->cfg.num_heads = (int64_t)read_le(c, &at, 8, &ok);
  c->cfg.num_kv_heads = (int64_t)read_le(c, &at, 8, &ok);
  c->cfg.head_dim = (int64_t)read_le(c, &at, 8, &ok);
  c->cfg.rope_theta = read_f32(c, &at, &ok);
  c->cfg.rms_norm_eps = read_f32(c, &at, &ok);
  c->cfg.context = (int64_t)read_le(c, &at, 8, &ok); /* the trained context; main() shortens it */
  (void)read_le(c, &at, 4, &ok);                      /* bos id: the prompt ids already hold it */
  c->n_eos = (uint32_t)read_le(c, &at, 4, &ok);
  if (c->n_eos > MAX_EOS) return fail_format(path, "too many eos ids");
  for (i = 0; i < MAX_EOS; ++i) c->eos[i] = (int32_t)read_le(c, &at, 4, &ok);
  if (version >= 2) { /* Gemma 3's fields (all zero for other models) */
    c->cfg.activation = (int32_t)read_le(c, &at, 4, &ok);
    c->cfg.scale_embeddings = (int32_t)read_le(c, &at, 4, &ok);
    c->cfg.sliding_window = (int64_t)read_le(c, &at, 8, &ok);
    c->cfg.sliding_window_pattern = (int64_t)read_le(c, &at, 8, &ok);
    c->cfg.rope_theta_local = read_f32(c, &at, &ok);
    if (version >= 3) { /* LongRoPE's attention factor, Gemma's score scale and soft-capping */
      c->cfg.rope_attn_factor = read_f32(c, &at, &ok);
      c->cfg.query_pre_attn_scalar = read_f32(c, &at, &ok);
      c->cfg.attn_logit_softcapping = read_f32(c, &at, &ok);
      c->cfg.final_logit_softcapping = read_f32(c, &at, &ok);
      c->cfg.nope_interval = (int64_t)read_le(c, &at, 4, &ok);
    } else {
      (void)read_le(c, &at, 4, &ok); /* (version 2: 0) */
    }
  }
  if (!ok || data_offset > c->size || c->n_weights > 100000) return fail_format(path, "bad header");

  /* Tensor table: one pass for the names' total length, one to fill the descriptors. */
  c->weights = (dt_weight*)calloc(c->n_weights ? c->n_weights : 1, sizeof(dt_weight));
  if (!c->weights) return fail_format(path, "out of memory");
  names_at = at;
  for (i = 0; i < c->n_weights && ok; ++i) {
    uint32_t len = (uint32_t)read_le(c, &at, 4, &ok), ndim;
    if (!ok || len > c->size - at) return fail_format(path, "truncated tensor table");
    at += len;
    names_len += (size_t)len + 1;
    (void)read_le(c, &at, 4, &ok);
    ndim = (uint32_t)read_le(c, &at, 4, &ok);
    if (ndim < 1 || ndim > 4) return fail_format(path, "bad ndim");
    at += 8 * (size_t)ndim + 16;
  }
  if (!ok || at > c->size) return fail_format(path, "truncated tensor table");
  c->names = (char*)malloc(names_len ? names_len : 1);
  if (!c->names) return fail_format(path, "out of memory");
  at = names_at;
  names_len = 0;
  for (i = 0; i < c->n_weights; ++i) {
    dt_weight* w = &c->weights[i];
    uint32_t len = (uint32_t)read_le(c, &at, 4, &ok), d;
    uint64_t offset, nbytes;
    memcpy(c->names + names_len, c->bytes + at, len);
    c->names[names_len + len] = '\0';
    w->name = c->names + names_len;
    names_len += (size_t)len + 1;
    at += len;
    w->dtype = (int32_t)read_le(c, &at, 4, &ok);
    w->ndim = (int32_t)read_le(c, &at, 4, &ok);
    for (d = 0; d < (uint32_t)w->ndim; ++d) w->shape[d] = (int64_t)read_le(c, &at, 8, &ok);
    offset = read_le(c, &at, 8, &ok);
    nbytes = read_le(c, &at, 8, &ok);
    if (!ok || offset > c->size - data_offset || nbytes > c->size - data_offset - offset)
      return fail_format(path, "tensor data outside the file");
    w->data = c->bytes + data_offset + offset;
    w->nbytes = nbytes; /* the library checks it against dtype and shape */
  }
  return 1;
}

static void free_container(container* c) {
  free(c->bytes);
  free(c->weights);
  free(c->names);
  c->bytes = NULL;
  c->weights = NULL;
  c->names = NULL;
}

/* Stops the program with the library's message when a call fails. */
static void check(dt_status s, const char* call) {
  if (s != DT_OK) {
    fprintf(stderr, "greedy: %s failed: %s: %s\n", call, dt_status_name(s), dt_last_error());
    exit(1);
  }
}

static int32_t argmax(const float* x, int64_t n) {
  int64_t i, best = 0;
  for (i = 1; i < n; ++i)
    if (x[i] > x[best]) best = i; /* the first of equal maxima, as numpy's argmax */
  return (int32_t)best;
}

static int parse_long(const char* s, long lo, long hi, long* out) {
  char* end;
  long v = strtol(s, &end, 10);
  if (*s == '\0' || *end != '\0' || v < lo || v > hi) return 0;
  *out = v;
  return 1;
}

/* The container's int32 id tensor `name` (code 32, one dimension, 4 bytes an id): its ids
 * (64-byte aligned in the file buffer) and count, and its index in the weight list; NULL and
 * -1 if it has none. */
static const int32_t* find_ids(const container* c, const char* name, int64_t* n, int64_t* index) {
  uint32_t i;
  *n = 0;
  *index = -1;
  for (i = 0; i < c->n_weights; ++i) {
    const dt_weight* w = &c->weights[i];
    if (w->dtype == VOCAB_MAP_CODE && strcmp(w->name, name) == 0 && w->ndim == 1 && w->shape[0] >= 0 &&
        w->nbytes == 4 * (uint64_t)w->shape[0]) {
      *n = w->shape[0];
      *index = i;
      return (const int32_t*)w->data;
    }
  }
  return NULL;
}

/* A draft container's vocab_map (int32 target ids), taken out of its weight list. */
static const int32_t* take_vocab_map(container* c, int64_t* n) {
  int64_t index;
  const int32_t* map = find_ids(c, "vocab_map", n, &index);
  uint32_t i;
  if (map) {
    for (i = (uint32_t)index; i + 1 < c->n_weights; ++i) c->weights[i] = c->weights[i + 1];
    --c->n_weights;
  }
  return map;
}

/* A corpus container's token ids (int32 `corpus_tokens`); NULL (with a message) if it has none. */
static const int32_t* corpus_tokens(const container* c, const char* path, int64_t* n) {
  int64_t index;
  const int32_t* ids = find_ids(c, "corpus_tokens", n, &index);
  if (!ids) fprintf(stderr, "greedy: %s: not a corpus container (no int32 corpus_tokens)\n", path);
  return ids;
}

static int is_eos(const container* c, int32_t id) {
  uint32_t e;
  for (e = 0; e < c->n_eos; ++e)
    if (id == c->eos[e]) return 1;
  return 0;
}

int main(int argc, char** argv) {
  container c, dc, cc;
  dt_target* target = NULL;
  dt_draft* draft = NULL;
  dt_speculator* spec = NULL;
  int32_t *tokens, *next_tokens = NULL, *emitted = NULL;
  float *logits, *features = NULL, *step_features = NULL;
  long threads = 1, n_new, v, use_lookup = 1;
  const char *draft_path = NULL, *corpus_path = NULL;
  int arg = 1, i, n_prompt;
  int64_t start, last_row, n_past, printed = 0, steps = 0, n_pairs, m, pair_rows;
  int32_t next;
  dt_tree_shape shape;
  dt_lookup_params lookup;
  int64_t* rows = NULL;

  while (argc - arg >= 2 && argv[arg][0] == '-' && argv[arg][1] != '\0' && argv[arg][2] == '\0') {
    if (argv[arg][1] == 't') {
      if (!parse_long(argv[arg + 1], 1, 1024, &threads)) {
        fprintf(stderr, "greedy: -t takes a thread count in 1..1024\n");
        return 2;
      }
    } else if (argv[arg][1] == 'd') {
      draft_path = argv[arg + 1];
    } else if (argv[arg][1] == 'c') {
      corpus_path = argv[arg + 1];
    } else if (argv[arg][1] == 'l') {
      if (!parse_long(argv[arg + 1], 0, 1, &use_lookup)) {
        fprintf(stderr, "greedy: -l takes 0 (no prompt lookup) or 1\n");
        return 2;
      }
    } else {
      break;
    }
    arg += 2;
  }
  if (argc - arg < 3 || !parse_long(argv[arg + 1], 0, 1L << 24, &n_new)) {
    fprintf(stderr, "usage: greedy [-t THREADS] [-d DRAFT] [-l 0|1] [-c CORPUS] WEIGHTS N_NEW ID [ID ...]\n");
    return 2;
  }
  if (corpus_path && (!draft_path || !use_lookup)) {
    fprintf(stderr, "greedy: -c needs a draft (-d) and prompt lookup on (not -l 0)\n");
    return 2;
  }
  n_prompt = argc - arg - 2;
  tokens = (int32_t*)malloc(sizeof(int32_t) * (size_t)n_prompt);
  if (!tokens) return 1;
  for (i = 0; i < n_prompt; ++i) {
    if (!parse_long(argv[arg + 2 + i], 0, INT32_MAX, &v)) {
      fprintf(stderr, "greedy: token id '%s' is not a non-negative integer\n", argv[arg + 2 + i]);
      return 2;
    }
    tokens[i] = (int32_t)v;
  }
  if (!load_container(argv[arg], &c)) return 1;
  dt_tree_shape_init(&shape); /* the default tree: the root and the draft's two best guesses */
  if (c.cfg.context < n_prompt + n_new) {
    fprintf(stderr, "greedy: %d prompt + %ld new tokens exceed the model's context of %" PRId64 "\n", n_prompt,
            n_new, c.cfg.context);
    return 2;
  }
  /* KV slots for exactly this run (a speculative step also needs room for its tree). */
  c.cfg.context = n_prompt + n_new + (draft_path ? shape.total_tokens : 0);
  c.cfg.threads = (int32_t)threads;
  check(dt_target_create(&c.cfg, c.weights, c.n_weights, &target), "dt_target_create");
  logits = (float*)malloc(sizeof(float) * (size_t)c.cfg.vocab_size);
  if (!logits) return 1;
  free_container(&c); /* the engine holds its own copy of the weights */

  if (draft_path) {
    dt_draft_config dcfg;
    int64_t n_map;
    const int32_t* map;
    if (!load_container(draft_path, &dc)) return 1;
    map = take_vocab_map(&dc, &n_map);
    dt_draft_config_init(&dcfg);
    dcfg.hidden_size = dc.cfg.hidden_size;
    dcfg.intermediate_size = dc.cfg.intermediate_size;
    dcfg.num_layers = dc.cfg.num_layers;
    dcfg.num_heads = dc.cfg.num_heads;
    dcfg.num_kv_heads = dc.cfg.num_kv_heads;
    dcfg.head_dim = dc.cfg.head_dim;
    dcfg.rope_theta = dc.cfg.rope_theta;
    dcfg.rms_norm_eps = dc.cfg.rms_norm_eps;
    dcfg.context = c.cfg.context + dcfg.max_batch; /* committed rows plus one tree's scratch rows */
    dcfg.threads = (int32_t)threads;
    check(dt_draft_create(target, &dcfg, dc.weights, dc.n_weights, map, n_map, &draft), "dt_draft_create");
    free_container(&dc);
    check(dt_speculator_create(target, draft, &spec), "dt_speculator_create");
    dt_lookup_params_init(&lookup); /* steps whose context repeats verify a copied chain */
    if (use_lookup) check(dt_speculator_set_lookup(spec, &lookup), "dt_speculator_set_lookup");
    if (corpus_path) { /* where the context has no match, a chain from the corpus */
      dt_corpus_params cparams;
      int64_t n_corpus;
      const int32_t* corpus;
      if (!load_container(corpus_path, &cc)) return 1;
      if (cc.cfg.vocab_size != c.cfg.vocab_size) {
        fprintf(stderr, "greedy: %s: a corpus for a vocabulary of %" PRId64 ", not this model's %" PRId64 "\n",
                corpus_path, cc.cfg.vocab_size, c.cfg.vocab_size);
        return 1;
      }
      if (!(corpus = corpus_tokens(&cc, corpus_path, &n_corpus))) return 1;
      dt_corpus_params_init(&cparams);
      check(dt_speculator_set_corpus(spec, corpus, n_corpus, &cparams), "dt_speculator_set_corpus");
      free_container(&cc); /* the speculator holds its own copy */
      fprintf(stderr, "greedy: corpus of %" PRId64 " tokens\n", n_corpus);
    }
    /* A step's pairs come in through one pair of buffers and its output goes to the other;
     * they swap after each step. A step emits at most max(depth, max_tokens) + 1 tokens. */
    pair_rows = (shape.depth > lookup.max_tokens ? shape.depth : lookup.max_tokens) + 1;
    if (n_prompt > pair_rows) pair_rows = n_prompt;
    features = (float*)malloc(sizeof(float) * (size_t)(pair_rows * c.cfg.hidden_size));
    step_features = (float*)malloc(sizeof(float) * (size_t)(pair_rows * c.cfg.hidden_size));
    emitted = (int32_t*)malloc(sizeof(int32_t) * (size_t)pair_rows);
    next_tokens = (int32_t*)malloc(sizeof(int32_t) * (size_t)pair_rows);
    rows = (int64_t*)malloc(sizeof(int64_t) * (size_t)c.cfg.max_batch);
    if (!features || !step_features || !emitted || !next_tokens || !rows) return 1;
  }

  /* Prefill in chunks of max_batch; only the last prompt row's logits are needed (and,
   * with a draft, every prompt row's features). */
  for (start = 0; start < n_prompt; start += c.cfg.max_batch) {
    const int64_t n = n_prompt - start < c.cfg.max_batch ? n_prompt - start : c.cfg.max_batch;
    const int is_last = start + n == n_prompt;
    int64_t r;
    last_row = n - 1;
    for (r = 0; draft && r < n; ++r) rows[r] = r;
    check(dt_target_forward(target, tokens + start, NULL, n, NULL, &last_row, is_last ? 1 : 0, logits,
                            draft ? rows : NULL, draft ? n : 0,
                            draft ? features + start * c.cfg.hidden_size : NULL),
          "dt_target_forward");
    check(dt_target_commit(target, NULL, 0), "dt_target_commit");
  }
  next = argmax(logits, c.cfg.vocab_size);
  if (!draft) {
    for (i = 0; i < n_new; ++i) {
      if (is_eos(&c, next)) break;
      printf("%s%" PRId32, i ? " " : "", next);
      if (i + 1 == n_new) break;
      last_row = 0;
      check(dt_target_forward(target, &next, NULL, 1, NULL, &last_row, 1, logits, NULL, 0, NULL),
            "dt_target_forward");
      check(dt_target_commit(target, NULL, 0), "dt_target_commit");
      next = argmax(logits, c.cfg.vocab_size);
    }
  } else {
    /* The draft's first pairs: (feature of prompt row j, token j + 1), the last token
     * being the target's first greedy token (the root of the first tree). */
    for (i = 0; i + 1 < n_prompt; ++i) next_tokens[i] = tokens[i + 1];
    next_tokens[n_prompt - 1] = next;
    n_pairs = n_prompt;
    emitted[0] = next;
    m = 1;
    for (;;) {
      int64_t j, stop = 0;
      float* f;
      int32_t* t;
      for (j = 0; j < m && printed < n_new; ++j) {
        if (is_eos(&c, emitted[j])) {
          stop = 1;
          break;
        }
        printf("%s%" PRId32, printed ? " " : "", emitted[j]);
        ++printed;
      }
      if (stop || printed >= n_new) break;
      check(dt_speculator_step(spec, features, next_tokens, n_pairs, &shape, emitted, step_features, &m),
            "dt_speculator_step");
      ++steps;
      /* the emitted tokens and their features are the next step's pairs */
      f = features, features = step_features, step_features = f;
      t = next_tokens, next_tokens = emitted, emitted = t;
      n_pairs = m;
      for (j = 0; j < m; ++j) emitted[j] = next_tokens[j];
    }
  }
  printf("\n");
  check(dt_target_n_past(target, &n_past), "dt_target_n_past");
  if (draft)
    fprintf(stderr, "greedy: %" PRId64 " speculative steps, %.2f tokens per step, ", steps,
            steps ? (double)(printed - 1) / (double)steps : 0.0);
  else
    fprintf(stderr, "greedy: ");
  fprintf(stderr, "%" PRId64 " tokens in the KV cache, libdovetail %s\n", n_past, dt_version_string(NULL, NULL, NULL));
  dt_speculator_destroy(spec);
  dt_draft_destroy(draft);
  dt_target_destroy(target);
  free(logits);
  free(tokens);
  free(features);
  free(step_features);
  free(emitted);
  free(next_tokens);
  free(rows);
  return 0;
}
