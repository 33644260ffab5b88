#include "model/speculative.h"

#include <algorithm>
#include <chrono>
#include <cstring>
#include <numeric>
#include <string>

#include "common/error.h"
#include "cpu/ops.h"
#include "model/device_engine.h"

namespace dovetail {

namespace {

using Clock = std::chrono::steady_clock;
double seconds(Clock::time_point a, Clock::time_point b) { return std::chrono::duration<double>(b - a).count(); }

// The EAGLE-2 candidate pool: index 0 is the root; scores are cumulative log-probabilities.
struct Pool {
  std::vector<int32_t> tokens;
  std::vector<int64_t> parents;
  std::vector<double> scores;
  std::vector<int64_t> row_of, hist_of;  // scratch row / history row of expanded nodes (-1: none)

  int64_t add(int32_t token, int64_t parent, double score) {
    tokens.push_back(token);
    parents.push_back(parent);
    scores.push_back(score);
    row_of.push_back(-1);
    hist_of.push_back(-1);
    return (int64_t)tokens.size() - 1;
  }
  int64_t size() const { return (int64_t)tokens.size(); }
  // The k-th best drafted score (-inf with fewer than k candidates).
  double kth_best(int64_t k) const {
    if (size() - 1 < k || k < 1) return -std::numeric_limits<double>::infinity();
    std::vector<double> s(scores.begin() + 1, scores.end());
    std::nth_element(s.begin(), s.begin() + (k - 1), s.end(), std::greater<double>());
    return s[k - 1];
  }
};

// Indices [0, n) ordered best first, ties by index (a stable sort on descending score).
std::vector<int64_t> ranking(const double* score, int64_t n) {
  std::vector<int64_t> order(n);
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return score[a] > score[b]; });
  return order;
}

// What both draft engines answer alike.
template <class Engine>
class EngineCalls : public DraftCalls {
 public:
  explicit EngineCalls(Engine& e) : e_(e) {}
  void commit_all() override {
    rows_.resize(e_.pending());
    std::iota(rows_.begin(), rows_.end(), 0);
    e_.commit(rows_.data(), (int64_t)rows_.size());
  }
  int64_t n_past() const override { return e_.n_past(); }
  int64_t max_batch() const override { return e_.options().max_batch; }
  int64_t context() const override { return e_.options().context; }
  int64_t draft_vocab() const override { return e_.draft_vocab(); }
  int64_t dim() const override { return e_.dims().dim; }
  int64_t vocab() const override { return e_.vocab(); }

 protected:
  const int64_t* all_rows(int64_t m) {  // 0 .. m - 1
    rows_.resize(m);
    std::iota(rows_.begin(), rows_.end(), 0);
    return rows_.data();
  }
  Engine& e_;
  std::vector<int64_t> rows_;
};

// The CPU draft: the history lives here; a frontier call gathers its features from it.
class CpuDraftCalls final : public EngineCalls<DraftEngine> {
 public:
  using EngineCalls::EngineCalls;
  void pairs(const float* features, const int32_t* tokens, const int32_t* positions, int64_t T, bool scored,
             int64_t k, int32_t* ids, float* logp) override {
    const int64_t last = T - 1;
    hist_.resize(T * dim());
    e_.forward(features, tokens, positions, T, nullptr, false, hist_.data(), scored ? &last : nullptr,
               scored ? 1 : 0, k, ids, logp);
  }
  void frontier(const int64_t* src, const int32_t* tokens, const int32_t* positions, int64_t m,
                const uint8_t* ancestors, int64_t k, int32_t* ids, float* logp) override {
    const int64_t D = dim(), H = (int64_t)hist_.size() / D;
    feats_.resize(m * D);
    for (int64_t i = 0; i < m; ++i) std::memcpy(&feats_[i * D], &hist_[src[i] * D], sizeof(float) * D);
    hist_.resize((H + m) * D);
    e_.forward(feats_.data(), tokens, positions, m, ancestors, true, &hist_[H * D], all_rows(m), m, k, ids, logp);
  }

 private:
  std::vector<float> hist_, feats_;  // hist_: [history rows, D]
};

// The device draft: the history stays on the device; a frontier call names its rows.
class DeviceDraftCalls final : public EngineCalls<DeviceDraftEngine> {
 public:
  using EngineCalls::EngineCalls;
  void pairs(const float* features, const int32_t* tokens, const int32_t* positions, int64_t T, bool scored,
             int64_t k, int32_t* ids, float* logp) override {
    const int64_t last = T - 1;
    e_.forward(features, nullptr, tokens, positions, T, nullptr, false, nullptr, scored ? &last : nullptr,
               scored ? 1 : 0, k, ids, logp);
  }
  void frontier(const int64_t* src, const int32_t* tokens, const int32_t* positions, int64_t m,
                const uint8_t* ancestors, int64_t k, int32_t* ids, float* logp) override {
    src_.assign(src, src + m);
    e_.forward(nullptr, src_.data(), tokens, positions, m, ancestors, true, nullptr, all_rows(m), m, k, ids, logp);
  }

 private:
  std::vector<int32_t> src_;
};

void check_pair(const LlamaEngine& target, const DraftCalls& draft) {
  DT_CHECK(draft.dim() == target.params().layer.dim,
           "the draft's hidden size " + std::to_string(draft.dim()) + " differs from the target's " +
               std::to_string(target.params().layer.dim));
  DT_CHECK(draft.vocab() == target.params().vocab, "the draft's vocabulary differs from the target's");
  DT_CHECK(target.params().first_layer == 0, "the target's first layers run elsewhere (gpu_layers): not supported");
}

}  // namespace

GreedySpeculator::GreedySpeculator(LlamaEngine& target, DraftEngine& draft)
    : target_(target), draft_(std::make_unique<CpuDraftCalls>(draft)), verifier_(target) {
  check_pair(target, *draft_);
  DT_CHECK(draft.embedding() == target.token_embedding().get(), "the draft was built for another target engine");
}

GreedySpeculator::GreedySpeculator(LlamaEngine& target, DeviceDraftEngine& draft)
    : target_(target), draft_(std::make_unique<DeviceDraftCalls>(draft)), verifier_(target) {
  check_pair(target, *draft_);
}

void GreedySpeculator::check(const float* features, const int32_t* next_tokens, int64_t n, const TreeShape& s,
                             int64_t pairs) const {
  DT_CHECK(features && next_tokens, "features and next_tokens must be given");
  DT_CHECK(n >= 1, "a step needs at least one new pair (the root), got " + std::to_string(n));
  DT_CHECK(s.top_k >= 1 && s.top_k <= std::min<int64_t>(256, draft_->draft_vocab()),
           "tree top_k must be in [1, " + std::to_string(std::min<int64_t>(256, draft_->draft_vocab())) + "], got " +
               std::to_string(s.top_k));
  DT_CHECK(s.depth >= 1, "tree depth must be at least 1, got " + std::to_string(s.depth));
  DT_CHECK(s.total_tokens >= 2, "tree total_tokens must be at least 2, got " + std::to_string(s.total_tokens));
  DT_CHECK(s.total_tokens <= target_.options().max_batch,
           "tree total_tokens " + std::to_string(s.total_tokens) + " exceeds the target's max_batch " +
               std::to_string(target_.options().max_batch));
  // (top_k x (depth - 1) scratch rows, compared without forming a product that may overflow)
  DT_CHECK(s.depth - 1 <= draft_->max_batch() / s.top_k,
           "the tree needs top_k " + std::to_string(s.top_k) + " x (depth - 1) " + std::to_string(s.depth - 1) +
               " draft scratch rows, more than the draft's max_batch " + std::to_string(draft_->max_batch()));
  DT_CHECK(target_.n_past() + s.total_tokens <= target_.options().context,
           "the target has " + std::to_string(target_.options().context - target_.n_past()) +
               " free slots, fewer than the tree's " + std::to_string(s.total_tokens));
  // The draft commits the new pairs (and any held since a lookup step) before it grows the
  // tree: checked here, so that a refused step changes nothing.
  const int64_t scratch = s.top_k * (s.depth - 1);
  DT_CHECK(pairs <= draft_->context() - draft_->n_past() - scratch,
           "the draft has " + std::to_string(draft_->context() - draft_->n_past()) + " free slots, fewer than the " +
               std::to_string(pairs) + " new pairs and " + std::to_string(scratch) + " scratch rows of this step");
}

DraftTree GreedySpeculator::propose(const float* features, const int32_t* next_tokens, int64_t n,
                                    const TreeShape& shape) {
  std::lock_guard<std::mutex> lock(mu_);
  return propose_locked(features, next_tokens, n, shape);
}

DraftTree GreedySpeculator::propose_locked(const float* features, const int32_t* next_tokens, int64_t n,
                                           const TreeShape& shape) {
  check(features, next_tokens, n, shape, n);
  const int64_t D = draft_->dim(), B = draft_->max_batch();
  // (top_k and the runner-up, within the draft's top-k limit)
  const int64_t k_root = std::min<int64_t>({shape.top_k + 1, 256, draft_->draft_vocab()});
  root_ids_.assign(k_root, 0);
  root_logp_.assign(k_root, 0.0f);
  // 1. The new pairs, committed, in batches of at most max_batch; the last output scores
  //    the root's successors.
  const int64_t start = draft_->n_past();
  for (int64_t s = 0; s < n; s += B) {
    const int64_t e = std::min(n, s + B), T = e - s;
    positions_.resize(T);
    for (int64_t t = 0; t < T; ++t) positions_[t] = (int32_t)(start + s + t);
    draft_->pairs(features + s * D, next_tokens + s, positions_.data(), T, e == n, k_root, root_ids_.data(),
                  root_logp_.data());
    draft_->commit_all();
    root_row_ = T - 1;
    hist_rows_ = T;
  }
  return grow(next_tokens[n - 1], shape);
}

DraftTree GreedySpeculator::grow(int32_t root, const TreeShape& shape) {
  const int64_t k = shape.top_k;
  const int32_t root_pos = (int32_t)draft_->n_past();  // frontier level d runs at root_pos + d - 1
  Pool pool;
  pool.add(root, -1, 0.0);
  pool.hist_of[0] = root_row_;
  std::vector<int64_t> frontier;
  for (int64_t j = 0; j < k; ++j) frontier.push_back(pool.add(root_ids_[j], 0, (double)root_logp_[j]));
  int64_t P = 0;                  // scratch rows so far
  std::vector<uint8_t> scratch;   // [P, P] ancestor sets among the scratch rows
  for (int64_t level = 1; level < shape.depth; ++level) {
    double best = -std::numeric_limits<double>::infinity();
    for (int64_t f : frontier) best = std::max(best, pool.scores[f]);
    if (best < pool.kth_best(shape.total_tokens - 1) || best < shape.min_score) break;
    // One draft call over the frontier (scratch rows P .. P + m - 1), each node's input
    // feature being its parent's output.
    const int64_t m = (int64_t)frontier.size(), W = P + m;
    anc_.assign(m * W, 0);
    ids_.resize(m);
    rows_.resize(m);
    positions_.assign(m, root_pos + (int32_t)level - 1);
    for (int64_t i = 0; i < m; ++i) {
      const int64_t parent = pool.parents[frontier[i]], prow = pool.row_of[parent];
      if (prow >= 0) std::memcpy(&anc_[i * W], &scratch[prow * P], P);
      anc_[i * W + P + i] = 1;
      rows_[i] = pool.hist_of[parent];
      ids_[i] = pool.tokens[frontier[i]];
    }
    std::vector<int32_t> kid_ids(m * k);
    logp_.resize(m * k);
    draft_->frontier(rows_.data(), ids_.data(), positions_.data(), m, anc_.data(), k, kid_ids.data(), logp_.data());
    for (int64_t i = 0; i < m; ++i) {
      pool.row_of[frontier[i]] = P + i;
      pool.hist_of[frontier[i]] = hist_rows_ + i;
    }
    hist_rows_ += m;
    std::vector<uint8_t> grown(W * W, 0);
    for (int64_t r = 0; r < P; ++r) std::memcpy(&grown[r * W], &scratch[r * P], P);
    for (int64_t i = 0; i < m; ++i) std::memcpy(&grown[(P + i) * W], &anc_[i * W], W);
    scratch.swap(grown);
    P = W;
    // Every child joins the pool; the best k form the next frontier.
    std::vector<double> cum(m * k);
    std::vector<int64_t> cand(m * k);
    for (int64_t i = 0; i < m; ++i)
      for (int64_t j = 0; j < k; ++j) {
        cum[i * k + j] = pool.scores[frontier[i]] + (double)logp_[i * k + j];
        cand[i * k + j] = pool.add(kid_ids[i * k + j], frontier[i], cum[i * k + j]);
      }
    const std::vector<int64_t> order = ranking(cum.data(), m * k);
    frontier.assign(k, 0);
    for (int64_t j = 0; j < k; ++j) frontier[j] = cand[order[j]];
  }
  // 3. The root and the best total_tokens - 1 candidates scoring at least min_score, in
  //    pool order (ancestor-closed: a child never outscores its parent, ties rank the
  //    earlier first).
  const int64_t n_ok = std::count_if(pool.scores.begin() + 1, pool.scores.end(),
                                     [&](double s) { return s >= shape.min_score; });
  const int64_t n_keep = std::min(shape.total_tokens - 1, n_ok);
  std::vector<int64_t> order = ranking(pool.scores.data() + 1, pool.size() - 1);
  std::vector<int64_t> keep = {0};
  for (int64_t i = 0; i < n_keep; ++i) keep.push_back(order[i] + 1);
  std::sort(keep.begin(), keep.end());
  std::vector<int64_t> remap(pool.size(), -1);
  for (size_t i = 0; i < keep.size(); ++i) remap[keep[i]] = (int64_t)i;
  DraftTree tree;
  for (int64_t u : keep) {
    tree.tokens.push_back(pool.tokens[u]);
    tree.parents.push_back(pool.parents[u] < 0 ? -1 : remap[pool.parents[u]]);
  }
  return tree;
}

GreedyStep GreedySpeculator::step(const float* features, const int32_t* next_tokens, int64_t n,
                                  const TreeShape& shape, bool want_rows) {
  std::lock_guard<std::mutex> lock(mu_);
  const auto t0 = Clock::now();
  GreedyStep out;
  DraftTree tree;
  if (lookup_) {
    const bool fresh = expect_n_past_ >= 0 && target_.n_past() != expect_n_past_;  // a new sequence
    check(features, next_tokens, n, shape, n + (fresh ? 0 : (int64_t)held_tokens_.size()));
    if (fresh) reset_locked();
    lookup_->extend(next_tokens, n);
    chain_.resize(lookup_->params().max_tokens);
    const int64_t c = lookup_->propose(target_.options().context - target_.n_past() - 1, chain_.data());
    const int64_t D = draft_->dim();
    if (c > 0) {  // verify the chain; the draft takes these pairs in at its next step
      held_features_.insert(held_features_.end(), features, features + n * D);
      held_tokens_.insert(held_tokens_.end(), next_tokens, next_tokens + n);
      tree.tokens.assign(1, next_tokens[n - 1]);
      tree.tokens.insert(tree.tokens.end(), chain_.begin(), chain_.begin() + c);
      for (int64_t i = 0; i <= c; ++i) tree.parents.push_back(i - 1);
      out.lookup = true;
      ++lookup_steps_;
      if (lookup_->last_from_corpus()) ++corpus_steps_;
    } else if (!held_tokens_.empty()) {  // the held pairs first, then this step's
      held_features_.insert(held_features_.end(), features, features + n * D);
      held_tokens_.insert(held_tokens_.end(), next_tokens, next_tokens + n);
      tree = propose_locked(held_features_.data(), held_tokens_.data(), (int64_t)held_tokens_.size(), shape);
      held_features_.clear();
      held_tokens_.clear();
    }
  }
  if (tree.tokens.empty()) tree = propose_locked(features, next_tokens, n, shape);
  const auto t1 = Clock::now();
  verifier_.run(tree, out, want_rows);
  if (lookup_) expect_n_past_ = target_.n_past();
  out.draft_s = out.lookup ? 0.0 : seconds(t0, t1);
  out.verify_s += out.lookup ? seconds(t0, t1) : 0.0;
  return out;
}

void GreedyVerifier::run(const DraftTree& tree, GreedyStep& out, bool want_rows, bool want_features) {
  std::lock_guard<std::mutex> lock(mu_);
  const auto t1 = Clock::now();
  const int64_t K = (int64_t)tree.tokens.size(), V = target_.params().vocab, D = target_.params().layer.dim;
  DT_CHECK(K >= 1, "a tree to verify needs at least its root");
  DT_CHECK((int64_t)tree.parents.size() == K, "tree has " + std::to_string(K) + " tokens but " +
                                                  std::to_string(tree.parents.size()) + " parents");
  DT_CHECK(tree.parents[0] == -1, "the tree's first node must be its root (parent -1)");
  for (int64_t i = 1; i < K; ++i)
    DT_CHECK(tree.parents[i] >= 0 && tree.parents[i] < i,
             "parent " + std::to_string(tree.parents[i]) + " of tree node " + std::to_string(i) +
                 " must be an earlier node");
  // One target call over the tree: each node sees the prefix and its ancestors.
  std::vector<int32_t> depth(K, 0);
  anc_.assign(K * K, 0);
  positions_.resize(K);
  for (int64_t i = 0; i < K; ++i) {
    const int64_t p = tree.parents[i];
    if (p >= 0) {
      depth[i] = depth[p] + 1;
      std::memcpy(&anc_[i * K], &anc_[p * K], p + 1);
    }
    anc_[i * K + i] = 1;
    positions_[i] = (int32_t)(target_.n_past() + depth[i]);
  }
  rows_.resize(K);
  std::iota(rows_.begin(), rows_.end(), 0);
  logits_.resize(K * V);
  feats_.resize(want_features ? K * D : 0);
  target_.forward(tree.tokens.data(), positions_.data(), K, anc_.data(), rows_.data(), K, logits_.data(),
                  want_features ? rows_.data() : nullptr, want_features ? K : 0,
                  want_features ? feats_.data() : nullptr);
  const auto t2 = Clock::now();
  // Acceptance in node order (a parent before its children): the accepted nodes form one
  // chain from the root, so the last one accepted ends the path.
  best_.resize(K);
  argmax_rows(logits_.data(), K, V, best_.data());
  std::vector<int64_t> path = {0};
  for (int64_t c = 1; c < K; ++c)
    if (tree.parents[c] == path.back() && tree.tokens[c] == best_[path.back()]) path.push_back(c);
  target_.commit(path.data(), (int64_t)path.size());
  out.emitted.clear();
  for (size_t i = 1; i < path.size(); ++i) out.emitted.push_back(tree.tokens[path[i]]);
  out.emitted.push_back((int32_t)best_[path.back()]);
  out.features.resize(want_features ? path.size() * D : 0);
  for (size_t i = 0; want_features && i < path.size(); ++i)
    std::memcpy(&out.features[i * D], &feats_[path[i] * D], sizeof(float) * D);
  out.rows.resize(want_rows ? path.size() * V : 0);
  for (size_t i = 0; want_rows && i < path.size(); ++i)  // emitted token i was chosen from path node i's row
    std::memcpy(&out.rows[i * V], &logits_[path[i] * V], sizeof(float) * V);
  out.tree_size = K;
  out.verify_s = seconds(t1, t2);
  out.accept_s = seconds(t2, Clock::now());
}

void GreedySpeculator::set_lookup(const LookupParams* params) {
  std::lock_guard<std::mutex> lock(mu_);
  // A chain is verified with its root in one target call.
  DT_CHECK(!params || params->max_tokens < target_.options().max_batch,
           "lookup max_tokens " + (params ? std::to_string(params->max_tokens) : std::string()) +
               " exceeds the target's max_batch " + std::to_string(target_.options().max_batch) +
               " minus the chain's root");
  lookup_ = params ? std::make_unique<NgramLookup>(*params) : nullptr;
  if (lookup_) lookup_->set_corpus(corpus_);
  reset_locked();
}

void GreedySpeculator::set_corpus(std::shared_ptr<const TokenCorpus> corpus) {
  std::lock_guard<std::mutex> lock(mu_);
  corpus_ = std::move(corpus);
  if (lookup_) lookup_->set_corpus(corpus_);
}

void GreedySpeculator::reset() {
  std::lock_guard<std::mutex> lock(mu_);
  reset_locked();
}

void GreedySpeculator::reset_locked() {
  if (lookup_) lookup_->clear();
  held_features_.clear();
  held_tokens_.clear();
  expect_n_past_ = -1;
}

}  // namespace dovetail
