// Checks a directory written by mixed_precision_benchmark: report.json conforms to its schema, every CSV file
// has a header and rows of the same width, summary.md has its training table, and every image the report
// links exists. Exits 0 when all holds, 1 listing every problem otherwise. Used by the end-to-end ctest.
//
//     check_benchmark_report DIR [--expect-runs N] [--expect-micro]

#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <sstream>
#include <string>
#include <vector>

#include "report/json_report.hpp"

namespace {

std::string read(const std::filesystem::path& path) {
  std::ifstream in(path);
  std::ostringstream text;
  text << in.rdbuf();
  return text.str();
}

// Cells of one CSV line, honouring quotes (enough for what CsvWriter writes).
std::size_t csv_width(const std::string& line) {
  std::size_t cells = 1;
  bool quoted = false;
  for (char c : line) {
    if (c == '"') quoted = !quoted;
    if (c == ',' && !quoted) ++cells;
  }
  return cells;
}

void check_csv(const std::filesystem::path& path, std::vector<std::string>& problems) {
  std::ifstream in(path);
  if (!in) {
    problems.push_back(path.filename().string() + " is missing");
    return;
  }
  std::string header;
  if (!std::getline(in, header) || header.empty()) {
    problems.push_back(path.filename().string() + " has no header row");
    return;
  }
  const std::size_t width = csv_width(header);
  std::string line;
  for (int number = 2; std::getline(in, line); ++number) {
    if (csv_width(line) != width) {
      problems.push_back(path.filename().string() + " line " + std::to_string(number) + " has " +
                         std::to_string(csv_width(line)) + " cells, the header " + std::to_string(width));
    }
  }
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 2) {
    std::cerr << "usage: check_benchmark_report DIR [--expect-runs N] [--expect-micro]\n";
    return 2;
  }
  const std::filesystem::path dir = argv[1];
  long expected_runs = -1;
  bool expect_micro = false;
  for (int i = 2; i < argc; ++i) {
    const std::string arg = argv[i];
    if (arg == "--expect-runs" && i + 1 < argc) {
      expected_runs = std::strtol(argv[++i], nullptr, 10);
    } else if (arg == "--expect-micro") {
      expect_micro = true;
    } else {
      std::cerr << "check_benchmark_report: unknown argument '" << arg << "'\n";
      return 2;
    }
  }

  std::vector<std::string> problems;
  const nlohmann::json report = nlohmann::json::parse(read(dir / "report.json"), nullptr, false);
  if (report.is_discarded()) {
    problems.push_back("report.json is missing or not valid JSON");
  } else {
    for (const std::string& problem : xax_bench::report_schema_problems(report)) problems.push_back(problem);
    if (expected_runs >= 0 && report.contains("training") && report.at("training").is_array() &&
        static_cast<long>(report.at("training").size()) != expected_runs) {
      problems.push_back("report.json has " + std::to_string(report.at("training").size()) +
                         " training runs, expected " + std::to_string(expected_runs));
    }
  }
  if (expect_micro && !report.is_discarded()) {
    const nlohmann::json& micro = report.value("micro_benchmarks", nlohmann::json());
    if (!micro.is_object() || micro.value("benchmarks", nlohmann::json::array()).empty()) {
      problems.push_back("report.json holds no Google Benchmark results");
    }
    check_csv(dir / "micro.csv", problems);
  }
  for (const char* csv : {"training.csv", "epochs.csv", "loss_curves.csv", "peers.csv"})
    check_csv(dir / csv, problems);

  const std::string summary = read(dir / "summary.md");
  if (summary.empty()) problems.push_back("summary.md is missing or empty");
  if (expected_runs != 0 && summary.find("| run | policy |") == std::string::npos) {
    problems.push_back("summary.md has no training table");
  }
  if (expect_micro && summary.find("## Micro-benchmarks") == std::string::npos) {
    problems.push_back("summary.md has no micro-benchmark table");
  }
  // Every image the summary links must exist.
  for (std::size_t at = summary.find("]("); at != std::string::npos; at = summary.find("](", at + 2)) {
    const std::size_t end = summary.find(')', at);
    const std::string image = summary.substr(at + 2, end - at - 2);
    if (!std::filesystem::exists(dir / image))
      problems.push_back("summary.md links " + image + ", which does not exist");
  }

  if (problems.empty()) {
    std::cout << dir.string() << ": report.json, CSV files and summary.md are well-formed\n";
    return 0;
  }
  for (const std::string& problem : problems) std::cerr << dir.string() << ": " << problem << '\n';
  return 1;
}
