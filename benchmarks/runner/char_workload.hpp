#pragma once
// The char-transformer workload of mixed_precision_benchmark: the character-level GPT trained under each
// policy (runner/char_training.hpp), the PyTorch peer of the same model (peers/torch_char_gpt.py) trained
// side by side, and the validation-loss checks. Its CSVs and plots are written with the MLP's
// (report/csv.hpp, report/gnuplot.hpp).

#include <cmath>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <optional>
#include <ostream>
#include <string>
#include <variant>
#include <vector>
#include <xax/utils/error.hpp>
#include <xax/utils/policy.hpp>

#include "report/format.hpp"
#include "report/results.hpp"
#include "runner/char_training.hpp"
#include "runner/options.hpp"
#include "runner/peer.hpp"
#include "runner/process.hpp"

namespace xax_bench {

/// The GPT configuration the command line asks for (nanoGPT's CPU one by default, --gpt-steps aside).
inline CharTrainingSetup char_setup(const Options& options, const std::string& policy,
                                    const std::string& loss_scaling, std::int64_t vocabulary) {
  CharTrainingSetup setup;
  setup.policy = policy;
  setup.loss_scaling = loss_scaling;
  setup.shape.vocabulary = vocabulary;
  setup.shape.block_size = options.gpt_block_size;
  setup.shape.layers = options.gpt_layers;
  setup.shape.heads = options.gpt_heads;
  setup.shape.embedding = options.gpt_embedding;
  setup.batch_size = options.gpt_batch_size;
  setup.steps = options.gpt_steps;
  setup.eval_interval = options.gpt_eval_interval;
  setup.eval_batches = options.gpt_eval_batches;
  setup.final_eval_batches = options.gpt_final_eval_batches;
  setup.seed = options.seed;
  setup.progress = options.progress;
  return setup;
}

/// The peer script of the GPT, next to the binary or in the source tree.
inline std::optional<std::filesystem::path> find_char_peer_script() {
  const std::optional<std::filesystem::path> mlp = find_peer_script();
  if (!mlp) return std::nullopt;
  std::error_code error;
  const std::filesystem::path script = mlp->parent_path() / "torch_char_gpt.py";
  if (std::filesystem::is_regular_file(script, error)) return script;
  return std::nullopt;
}

/// What the PyTorch GPT measured.
struct TorchCharRun {
  double median_step_ms = 0;
  double val_loss = 0;
};

inline std::variant<TorchCharRun, std::string> run_torch_char_peer(const std::filesystem::path& python,
                                                                   const std::filesystem::path& script,
                                                                   const std::filesystem::path& corpus_file,
                                                                   const CharTrainingSetup& setup,
                                                                   int threads,
                                                                   const std::filesystem::path& out_dir) {
  const std::filesystem::path json =
      out_dir / ("peer_torch_char_gpt_" + setup.policy + "_threads" + std::to_string(threads) + ".json");
  const ProcessResult result = run_process({python.string(),  script.string(),
                                            "--threads",      std::to_string(threads),
                                            "--policy",       setup.policy,
                                            "--text",         corpus_file.string(),
                                            "--steps",        std::to_string(setup.steps),
                                            "--batch-size",   std::to_string(setup.batch_size),
                                            "--block-size",   std::to_string(setup.shape.block_size),
                                            "--n-layer",      std::to_string(setup.shape.layers),
                                            "--n-head",       std::to_string(setup.shape.heads),
                                            "--n-embd",       std::to_string(setup.shape.embedding),
                                            "--eval-batches", std::to_string(setup.final_eval_batches),
                                            "--seed",         std::to_string(setup.seed),
                                            "--json",         json.string()},
                                           out_dir / "peer_char_gpt.log");
  if (!result.succeeded()) return result.error + " (see " + (out_dir / "peer_char_gpt.log").string() + ")";
  const nlohmann::json parsed = nlohmann::json::parse(read_text_file(json), nullptr, false);
  if (!parsed.is_object() || !parsed.contains("median_step_ms") || !parsed.contains("val_loss") ||
      !parsed.at("median_step_ms").is_number() || !parsed.at("val_loss").is_number()) {
    return "the peer wrote no median_step_ms and val_loss to " + json.string();
  }
  return TorchCharRun{parsed.at("median_step_ms").get<double>(), parsed.at("val_loss").get<double>()};
}

namespace detail {

// By what the policy is, not how it was spelt ("f32" is the "default" reference).
inline const TrainingRun* find_char_run(const BenchmarkReport& report, const std::string& policy) {
  for (const TrainingRun& run : report.training) {
    if (run.workload == "char-transformer" && same_policy(run.policy, policy)) return &run;
  }
  return nullptr;
}

}  // namespace detail

/// Trains the GPT under every policy of `options`, runs the PyTorch peer beside it (unless skipped), and adds
/// the runs, comparisons and checks to `report`. `loss_scaling_for` picks each policy's loss scaling as the
/// MLP runs do. Throws xax::DataError when the corpus is missing or empty.
template <class LossScalingFor>
void run_char_workload(BenchmarkReport& report, const Options& options, std::ostream& say,
                       const LossScalingFor& loss_scaling_for) {
  const CharCorpus corpus = load_char_corpus(options.text, options.gpt_block_size);
  const std::string corpus_note =
      "char-transformer corpus: " + corpus.source + ", " + std::to_string(corpus.characters) +
      " characters, vocabulary " + std::to_string(corpus.vocabulary.size()) + ", " +
      std::to_string(corpus.train.size()) + " train / " + std::to_string(corpus.val.size()) + " validation";
  report.notes.push_back(corpus_note);
  say << "\nTraining a character-level GPT (" << options.gpt_layers << " layers, " << options.gpt_heads
      << " heads, n_embd " << options.gpt_embedding << ", block " << options.gpt_block_size << ", batch "
      << options.gpt_batch_size << ", " << options.gpt_steps << " steps, AdamW, warm-up + cosine):\n  "
      << corpus_note << "\n"
      << std::flush;
  std::vector<CharTrainingSetup> setups;
  for (const std::string& policy : options.policies) {
    setups.push_back(char_setup(options, policy, loss_scaling_for(options, xax::get_policy(policy)),
                                static_cast<std::int64_t>(corpus.vocabulary.size())));
    require_gpt_fits(setups.back(), memory_budget());
  }
  for (const CharTrainingSetup& setup : setups) {
    report.training.push_back(run_char_training(setup, corpus));
    const TrainingRun& run = report.training.back();
    say << "  " << run.policy << ": val loss " << fixed(run.val_loss.value_or(NAN), 4) << ", train loss "
        << fixed(run.final_train_loss, 4) << ", step " << fixed(run.step_time_ms, 2) << " ms ("
        << fixed(run.tokens_per_s, 0) << " tokens/s), peak RSS +" << mib(run.peak_rss_growth_bytes())
        << ", skipped " << run.skipped_steps << ", final scale " << scale_text(run.final_loss_scale) << '\n';
    if (!run.error.empty()) say << "    stopped early: " << run.error << '\n';
    say << std::flush;
  }

  const TrainingRun* reference = detail::find_char_run(report, "default");
  for (const TrainingRun& run : report.training) {
    if (run.workload != "char-transformer" || is_fp32_reference(run.policy) || reference == nullptr) continue;
    const double difference = run.val_loss.value_or(NAN) - reference->val_loss.value_or(NAN);
    const bool pass = std::abs(difference) <= 0.03;
    report.notes.push_back(std::string(pass ? "PASS" : "FAIL") + " char-transformer val loss: " + run.policy +
                           " " + fixed(run.val_loss.value_or(NAN), 4) + " vs fp32 " +
                           fixed(reference->val_loss.value_or(NAN), 4) + " (difference " +
                           fixed(difference, 4) + ", target |difference| <= 0.03); " +
                           std::to_string(run.skipped_steps) + " skipped step(s), final loss scale " +
                           scale_text(run.final_loss_scale));
  }

  if (options.skip_peer) return;
  const TorchPython torch = find_torch_python(options.python, options.out);
  if (!torch.python) {
    report.notes.push_back("char-transformer PyTorch peer: " + torch.note);
    return;
  }
  const std::optional<std::filesystem::path> script = find_char_peer_script();
  if (!script) {
    report.notes.push_back("char-transformer PyTorch peer: peers/torch_char_gpt.py was not found");
    return;
  }
  report.torch_version = torch.torch_version;
  // The peer reads the very text xax trained on, so both split and tokenise the same characters.
  const std::filesystem::path corpus_file = options.out / "char_corpus.txt";
  {
    std::ofstream out(corpus_file, std::ios::binary);
    for (const std::int32_t id : corpus.train) out.put(corpus.vocabulary[static_cast<std::size_t>(id)]);
    for (const std::int32_t id : corpus.val) out.put(corpus.vocabulary[static_cast<std::size_t>(id)]);
    // A short file (a full disk) would have the peer train on other text than xax did.
    out.close();
    if (!out)
      throw xax::DataError("cannot write the corpus for the PyTorch peer to '" + corpus_file.string() + "'");
  }
  for (const CharTrainingSetup& xax_setup : setups) {
    // The peer knows the presets default and mixed; a run of either, however spelt, is compared under its
    // preset's name.
    CharTrainingSetup setup = xax_setup;
    if (same_policy(setup.policy, "default")) {
      setup.policy = "default";
    } else if (same_policy(setup.policy, "mixed")) {
      setup.policy = "mixed";
    } else {
      continue;
    }
    const TrainingRun* run = detail::find_char_run(report, setup.policy);
    say << "PyTorch char GPT: " << setup.policy << ", " << options.threads << " thread(s), " << setup.steps
        << " steps..." << std::flush;
    const auto outcome =
        run_torch_char_peer(*torch.python, *script, corpus_file, setup, options.threads, options.out);
    if (const auto* torch_run = std::get_if<TorchCharRun>(&outcome)) {
      PeerComparison comparison;
      comparison.workload = "char-transformer";
      comparison.policy = setup.policy;
      comparison.threads = options.threads;
      comparison.torch_step_ms = torch_run->median_step_ms;
      comparison.xax_step_ms = run->step_time_ms;
      comparison.xax_source = "char-transformer training run, median step";
      comparison.target_ratio = setup.policy == "mixed" ? 0.7 : 0.0;  // issue 14: mixed <= 0.7x autocast-bf16
      comparison.torch_val_loss = torch_run->val_loss;
      comparison.xax_val_loss = run->val_loss;
      report.peers.push_back(comparison);
      say << " " << fixed(torch_run->median_step_ms, 2) << " ms per step, val loss "
          << fixed(torch_run->val_loss, 4) << " (xax " << fixed(run->step_time_ms, 2) << " ms, val loss "
          << fixed(run->val_loss.value_or(NAN), 4) << ")\n";
      if (setup.policy == "default") {
        const double difference = run->val_loss.value_or(NAN) - torch_run->val_loss;
        report.notes.push_back(std::string(std::abs(difference) <= 0.05 ? "PASS" : "FAIL") +
                               " char-transformer fp32 val loss vs PyTorch: xax " +
                               fixed(run->val_loss.value_or(NAN), 4) + ", PyTorch " +
                               fixed(torch_run->val_loss, 4) + " (difference " + fixed(difference, 4) +
                               ", target |difference| <= 0.05)");
      }
    } else {
      report.notes.push_back("char-transformer PyTorch peer failed (" + setup.policy +
                             "): " + std::get<std::string>(outcome));
      say << " failed: " << std::get<std::string>(outcome) << '\n';
    }
  }
}

}  // namespace xax_bench
