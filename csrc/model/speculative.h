// Greedy speculative decoding, one native call per step, with the draft on the CPU or on a
// device (DeviceDraftEngine: tree levels then name history rows that stay on the device):
//
//   1. the draft takes the pairs (f_j, x_{j+1}) of the positions committed by the last
//      step (committed), and its output at the last one scores the root's successors;
//   2. EAGLE-2 growth: each level expands the top_k best frontier nodes in one draft call
//      (scratch rows), every child joins a candidate pool, the next frontier is the best
//      top_k children; growth stops when the frontier cannot enter the tree any more;
//   3. the tree is the root and the total_tokens - 1 best candidates (at least min_score);
//   4. the target verifies the whole tree in one call; a drafted node is accepted when its
//      token is the target's argmax at its parent and its parent is accepted; the accepted
//      rows are committed and the argmax after the last one is the bonus token.
//
// The rules are those of the Python orchestrator (dovetail_ext.draft.Draft._grow,
// dovetail_ext.sampling.accept_greedy): the same trees, hence the same tokens, which are
// the target's own greedy tokens. Python keeps the general paths (sampling, drafting ahead,
// a partly offloaded target, the context's last slots); this one removes the interpreter
// from the common greedy step.
#pragma once
#include <cmath>
#include <cstdint>
#include <limits>
#include <memory>
#include <mutex>
#include <vector>

#include "model/draft.h"
#include "model/llama.h"
#include "model/lookup.h"

namespace dovetail {

class DeviceDraftEngine;

// The draft calls a step makes, over the CPU draft or the device draft. Outputs form a
// history: the rows of the last pairs() call, then those of each frontier() call in order.
class DraftCalls {
 public:
  virtual ~DraftCalls() = default;
  // T new pairs at positions (committed afterwards by commit_all); the history restarts
  // with their outputs. Scores the successors of row T - 1 when `scored` (k of them).
  virtual void pairs(const float* features, const int32_t* tokens, const int32_t* positions, int64_t T,
                     bool scored, int64_t k, int32_t* ids, float* logp) = 0;
  // m frontier nodes as scratch rows after the earlier ones, each with ancestors [m, P + m]
  // and the feature in history row src[i]; their outputs join the history; the successors
  // of every row are scored (k each).
  virtual void frontier(const int64_t* src, const int32_t* tokens, const int32_t* positions, int64_t m,
                        const uint8_t* ancestors, int64_t k, int32_t* ids, float* logp) = 0;
  virtual void commit_all() = 0;
  virtual int64_t n_past() const = 0;
  virtual int64_t max_batch() const = 0;
  virtual int64_t context() const = 0;
  virtual int64_t draft_vocab() const = 0;
  virtual int64_t dim() const = 0;
  virtual int64_t vocab() const = 0;
};

struct TreeShape {  // defaults: the Python TreeParams() (min_prob 0.1)
  int64_t top_k = 2, depth = 1, total_tokens = 3;
  double min_score = std::log(0.1);  // log(min_prob); -inf keeps every candidate
};

// A drafted tree: root first, a parent always before its child.
struct DraftTree {
  std::vector<int32_t> tokens;
  std::vector<int64_t> parents;  // -1 for the root
};

struct GreedyStep {
  std::vector<int32_t> emitted;  // the accepted drafted tokens, then the bonus token
  std::vector<float> features;   // target features of the committed rows [emitted.size(), D]
  int64_t tree_size = 0;
  double draft_s = 0.0, verify_s = 0.0, accept_s = 0.0;
  bool lookup = false;  // the step verified a prompt-lookup chain (the draft did not run)
  // With want_rows: the target's logits row each emitted token was chosen from
  // [emitted.size(), V] (the API's log-probabilities); empty otherwise.
  std::vector<float> rows;
};

// Step 4 of a greedy step, on its own: one target call over a tree (a drafted tree, a
// prompt-lookup chain, or the root alone), greedy acceptance, and the commit of the accepted
// path. The Python orchestrator verifies lookup chains and plain greedy steps through it, so
// no logits row leaves native code unless asked for. Scratch is kept across calls.
class GreedyVerifier {
 public:
  explicit GreedyVerifier(LlamaEngine& target) : target_(target) {}
  // Fills out.emitted (the accepted drafted tokens, then the bonus token), out.tree_size,
  // the verify / accept seconds, out.features with want_features, out.rows with want_rows.
  // The tree's parents must come before their children, the root first; the target needs
  // room for the whole tree.
  void run(const DraftTree& tree, GreedyStep& out, bool want_rows, bool want_features = true);

 private:
  LlamaEngine& target_;
  std::mutex mu_;
  std::vector<float> logits_, feats_;
  std::vector<int32_t> positions_;
  std::vector<int64_t> rows_, best_;
  std::vector<uint8_t> anc_;
};

class GreedySpeculator {
 public:
  // Both engines must outlive the speculator; the draft must belong to the target.
  GreedySpeculator(LlamaEngine& target, DraftEngine& draft);
  GreedySpeculator(LlamaEngine& target, DeviceDraftEngine& draft);

  // Steps 1-2-3: feed the draft the n pairs (features [n, D] of committed positions,
  // next_tokens [n]; next_tokens[n - 1] is the root, not yet seen by the target) and grow
  // a tree rooted at it. The draft keeps the pairs committed.
  DraftTree propose(const float* features, const int32_t* next_tokens, int64_t n, const TreeShape& shape);

  // One whole step (1-4). The target needs room for total_tokens more tokens.
  //
  // With prompt lookup on, the next_tokens of every step form the context, and when its
  // last tokens occurred before, the step verifies the chain that followed them instead of
  // a drafted tree (the same acceptance); the draft does not run and the step's pairs are
  // held back for it, to go in before the next drafting step's. A chain step emits up to
  // max_tokens + 1 tokens. A target whose n_past is not where the last step left it means
  // a new sequence: the context and the held pairs are dropped (reset() does it at once).
  GreedyStep step(const float* features, const int32_t* next_tokens, int64_t n, const TreeShape& shape,
                  bool want_rows = false);

  // Prompt lookup for step(): params, or nullptr to turn it off (the default). Resets.
  void set_lookup(const LookupParams* params);
  // A corpus for the lookup (TokenCorpus), or nullptr; kept across set_lookup and reset.
  void set_corpus(std::shared_ptr<const TokenCorpus> corpus);
  void reset();
  const LookupParams* lookup_params() const { return lookup_ ? &lookup_->params() : nullptr; }
  int64_t lookup_steps() const { return lookup_steps_; }
  int64_t corpus_steps() const { return corpus_steps_; }  // those of them with a corpus chain

  int64_t dim() const { return draft_->dim(); }

 private:
  // Every argument of a step, and room for `pairs` new draft pairs and the tree's scratch rows.
  void check(const float* features, const int32_t* next_tokens, int64_t n, const TreeShape& shape,
             int64_t pairs) const;
  DraftTree propose_locked(const float* features, const int32_t* next_tokens, int64_t n, const TreeShape& shape);
  DraftTree grow(int32_t root, const TreeShape& shape);
  void reset_locked();

  LlamaEngine& target_;
  std::unique_ptr<DraftCalls> draft_;
  GreedyVerifier verifier_;  // step 4
  std::mutex mu_;
  int64_t root_row_ = 0, hist_rows_ = 0;  // the root's history row; rows in the history
  std::vector<int32_t> root_ids_;
  std::vector<float> root_logp_;
  // Scratch for draft calls, reused across steps.
  std::vector<float> logp_;
  std::vector<int32_t> ids_, positions_;
  std::vector<int64_t> rows_;
  std::vector<uint8_t> anc_;
  // Prompt lookup: the context's n-grams, the pairs held back for the draft, and where the
  // target's n_past was after the last step.
  std::unique_ptr<NgramLookup> lookup_;
  std::shared_ptr<const TokenCorpus> corpus_;
  std::vector<float> held_features_;
  std::vector<int32_t> held_tokens_, chain_;
  int64_t expect_n_past_ = -1, lookup_steps_ = 0, corpus_steps_ = 0;
};

}  // namespace dovetail
