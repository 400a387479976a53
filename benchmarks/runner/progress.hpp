#pragma once
// Progress of a long run on stderr: one line rewritten in place on a terminal, and a line every few seconds
// otherwise (a CI log or a file), so neither floods its reader.

#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <string>

namespace xax_bench {

class Progress {
 public:
  using Clock = std::chrono::steady_clock;

  /// `total` is the number of units (steps) the task will take; `title` names it ("mixed: training").
  Progress(std::string title, std::int64_t total, bool enabled = true)
      : title_(std::move(title)),
        total_(std::max<std::int64_t>(total, 1)),
        enabled_(enabled),
        terminal_(::isatty(STDERR_FILENO) != 0),
        start_(Clock::now()),
        last_print_(start_) {}

  Progress(const Progress&) = delete;
  Progress& operator=(const Progress&) = delete;
  ~Progress() { finish(); }

  /// Reports that `done` units are complete; `detail` is appended ("epoch 2/10, loss 0.41").
  void update(std::int64_t done, const std::string& detail) {
    if (!enabled_ || finished_) return;
    const auto now = Clock::now();
    // A terminal redraws at most 10 times a second; a log gets a line every 10 seconds.
    const auto interval = terminal_ ? std::chrono::milliseconds(100) : std::chrono::milliseconds(10000);
    if (now - last_print_ < interval && done < total_) return;
    last_print_ = now;
    const double elapsed = std::chrono::duration<double>(now - start_).count();
    const double fraction = static_cast<double>(done) / static_cast<double>(total_);
    const double remaining = fraction > 0 ? elapsed * (1.0 - fraction) / fraction : 0.0;
    char line[256];
    std::snprintf(line, sizeof line, "%s %5.1f%% (%lld/%lld) %s, %.0fs elapsed, ~%.0fs left", title_.c_str(),
                  100.0 * fraction, static_cast<long long>(done), static_cast<long long>(total_),
                  detail.c_str(), elapsed, remaining);
    if (terminal_) {
      std::fprintf(stderr, "\r%s\x1b[K", line);
      drawn_ = true;
    } else {
      std::fprintf(stderr, "%s\n", line);
    }
    std::fflush(stderr);
  }

  /// Clears the updating line (a terminal keeps only the caller's final summary line).
  void finish() {
    if (finished_) return;
    finished_ = true;
    if (drawn_) std::fprintf(stderr, "\r\x1b[K");
    std::fflush(stderr);
  }

 private:
  std::string title_;
  std::int64_t total_;
  bool enabled_;
  bool terminal_;
  bool drawn_ = false;
  bool finished_ = false;
  Clock::time_point start_;
  Clock::time_point last_print_;
};

}  // namespace xax_bench
