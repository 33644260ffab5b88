/* greedy.c: greedy decoding through the dovetail C API, without Python.
 *
 * Reads the weight container written by `python -m dovetail_ext.export_c_weights FILE`
 * (layout in python/dovetail_ext/capi.py), builds a target engine, runs the prompt token
 * ids and prints the greedy continuation's ids on one line, stopping early at an
 * end-of-sequence id (which is not printed). No tokenizer: ids in, ids out.
 *
 *   greedy [-t THREADS] WEIGHTS N_NEW ID [ID ...]
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
  if (version != 1) return fail_format(path, "unsupported format version");
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

int main(int argc, char** argv) {
  container c;
  dt_target* target = NULL;
  int32_t* tokens;
  float* logits;
  long threads = 1, n_new, v;
  int arg = 1, i, n_prompt;
  int64_t start, last_row, n_past;
  int32_t next;
  uint32_t e;

  if (argc > 2 && strcmp(argv[1], "-t") == 0) {
    if (!parse_long(argv[2], 1, 1024, &threads)) {
      fprintf(stderr, "greedy: -t takes a thread count in 1..1024\n");
      return 2;
    }
    arg = 3;
  }
  if (argc - arg < 3 || !parse_long(argv[arg + 1], 0, 1L << 24, &n_new)) {
    fprintf(stderr, "usage: greedy [-t THREADS] WEIGHTS N_NEW ID [ID ...]\n");
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
  if (c.cfg.context < n_prompt + n_new) {
    fprintf(stderr, "greedy: %d prompt + %ld new tokens exceed the model's context of %" PRId64 "\n", n_prompt,
            n_new, c.cfg.context);
    return 2;
  }
  c.cfg.context = n_prompt + n_new; /* KV slots for exactly this run */
  c.cfg.threads = (int32_t)threads;
  check(dt_target_create(&c.cfg, c.weights, c.n_weights, &target), "dt_target_create");
  logits = (float*)malloc(sizeof(float) * (size_t)c.cfg.vocab_size);
  if (!logits) return 1;
  free_container(&c); /* the engine holds its own copy of the weights */

  /* Prefill in chunks of max_batch; only the last prompt row's logits are needed. */
  for (start = 0; start < n_prompt; start += c.cfg.max_batch) {
    const int64_t n = n_prompt - start < c.cfg.max_batch ? n_prompt - start : c.cfg.max_batch;
    const int is_last = start + n == n_prompt;
    last_row = n - 1;
    check(dt_target_forward(target, tokens + start, NULL, n, NULL, &last_row, is_last ? 1 : 0, logits, NULL, 0,
                            NULL),
          "dt_target_forward");
    check(dt_target_commit(target, NULL, 0), "dt_target_commit");
  }
  next = argmax(logits, c.cfg.vocab_size);
  for (i = 0; i < n_new; ++i) {
    for (e = 0; e < c.n_eos; ++e)
      if (next == c.eos[e]) break;
    if (e < c.n_eos) break;
    printf("%s%" PRId32, i ? " " : "", next);
    if (i + 1 == n_new) break;
    last_row = 0;
    check(dt_target_forward(target, &next, NULL, 1, NULL, &last_row, 1, logits, NULL, 0, NULL),
          "dt_target_forward");
    check(dt_target_commit(target, NULL, 0), "dt_target_commit");
    next = argmax(logits, c.cfg.vocab_size);
  }
  printf("\n");
  check(dt_target_n_past(target, &n_past), "dt_target_n_past");
  fprintf(stderr, "greedy: %" PRId64 " tokens in the KV cache, libdovetail %s\n", n_past,
          dt_version_string(NULL, NULL, NULL));
  dt_target_destroy(target);
  free(logits);
  free(tokens);
  return 0;
}
