#include "io/output_dir.hpp"

#include <unistd.h>

#include <csignal>
#include <cstdio>
#include <filesystem>
#include <fstream>

#include "common.hpp"

namespace llmq {

namespace fs = std::filesystem;

namespace {

// The handler's paths, made before it is armed (one OutputDir at a time; a second is simply not armed).
constexpr int kSlots = 24;
char g_files[kSlots][4096];
char g_dir[4096];
volatile std::sig_atomic_t g_armed = 0;
constexpr int kSignals[3] = {SIGINT, SIGTERM, SIGHUP};
struct sigaction g_old[3];

extern "C" void remove_tmp_and_die(int sig) {
  if (g_armed) {
    for (const char* f : g_files)
      if (f[0]) ::unlink(f);
    ::rmdir(g_dir);
  }
  std::signal(sig, SIG_DFL);
  std::raise(sig);
}

}  // namespace

OutputDir::OutputDir(const std::string& out_dir, const std::vector<std::string>& files)
    : out_(out_dir), tmp_(out_dir + ".tmp-" + std::to_string(::getpid())) {
  if (fs::exists(out_)) throw Error(out_ + ": already exists; choose a new output directory or remove it");
  std::error_code ec;
  fs::remove_all(tmp_, ec);
  fs::create_directories(tmp_, ec);
  if (ec) throw Error(tmp_ + ": cannot create: " + ec.message());
  if (g_armed || files.size() > size_t(kSlots) || tmp_.size() >= sizeof g_dir) return;
  for (int i = 0; i < kSlots; ++i) {
    const std::string f = size_t(i) < files.size() ? tmp_ + "/" + files[size_t(i)] : std::string();
    std::snprintf(g_files[i], sizeof g_files[i], "%s", f.size() < sizeof g_files[i] ? f.c_str() : "");
  }
  std::snprintf(g_dir, sizeof g_dir, "%s", tmp_.c_str());
  struct sigaction sa {};
  sa.sa_handler = remove_tmp_and_die;
  sigemptyset(&sa.sa_mask);
  for (int i = 0; i < 3; ++i) sigaction(kSignals[i], &sa, &g_old[i]);
  g_armed = 1;
  armed_ = true;
}

OutputDir::~OutputDir() {
  std::error_code ec;
  if (!committed_) fs::remove_all(tmp_, ec);
  if (armed_) {
    g_armed = 0;
    for (int i = 0; i < 3; ++i) sigaction(kSignals[i], &g_old[i], nullptr);
  }
}

void OutputDir::commit() {
  std::error_code ec;
  fs::rename(tmp_, out_, ec);
  if (ec) throw Error(out_ + ": cannot move the finished checkpoint into place: " + ec.message());
  committed_ = true;
}

void write_text_file(const std::string& path, const std::string& text) {
  std::ofstream f(path, std::ios::binary);
  f << text;
  f.close();
  if (!f) throw Error(path + ": write failed");
}

}  // namespace llmq
