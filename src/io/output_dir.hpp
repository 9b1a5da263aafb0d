// A checkpoint directory written atomically (llmq quantize, llmq synth): the files go into a temporary directory
// beside the target, `<out>.tmp-<pid>`, which commit() renames onto the target at the end. Until then, an
// exception (the destructor) or Ctrl-C / SIGTERM / SIGHUP (a signal handler) removes it, so an interrupted or
// failed run leaves neither a directory that loads nor gigabytes of partial shards.
#pragma once

#include <string>
#include <vector>

namespace llmq {

class OutputDir {
 public:
  // Throws llmq::Error when out_dir exists or the temporary directory cannot be made. `files`: the names the
  // run may write there, which the signal handler unlinks (it may only call unlink and rmdir, so it cannot list
  // the directory; a file not named here would keep rmdir from removing it, and is then left behind).
  OutputDir(const std::string& out_dir, const std::vector<std::string>& files);
  ~OutputDir();
  OutputDir(const OutputDir&) = delete;
  OutputDir& operator=(const OutputDir&) = delete;

  const std::string& tmp() const { return tmp_; }
  // Renames the temporary directory onto the target and disarms the cleanup; throws llmq::Error when it cannot.
  void commit();

 private:
  std::string out_, tmp_;
  bool committed_ = false, armed_ = false;
};

// Writes a small text file and checks that it reached the file system (the close included); throws llmq::Error.
void write_text_file(const std::string& path, const std::string& text);

}  // namespace llmq
