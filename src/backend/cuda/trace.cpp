#include "backend/cuda/trace.hpp"

#include <cstdio>

#ifdef LLMQ_HAVE_CUPTI
#include <cupti.h>
#include <cxxabi.h>
#include <dlfcn.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <map>
#include <mutex>
#include <string>
#include <vector>
#endif

namespace llmq::cuda {

#ifndef LLMQ_HAVE_CUPTI

void trace_start() { std::fprintf(stderr, "llmq: note: LLMQ_CUDA_TRACE: built without CUPTI's header; nothing is traced\n"); }
void trace_report() {}

#else

namespace {

struct Rec {
  const char* name;  // CUPTI's string, shared by every record of the kernel
  uint64_t start, end;  // ns
  uint32_t graph;       // 0: launched outside a graph
  uint64_t node;
};

std::mutex mu;
std::vector<Rec> recs;
bool started = false;

// CUPTI is loaded when tracing starts, not linked: llmq runs where the CUDA runtime is and CUPTI (a part of
// the toolkit, not of the runtime) is not.
struct Cupti {
  CUptiResult (*register_callbacks)(CUpti_BuffersCallbackRequestFunc, CUpti_BuffersCallbackCompleteFunc) = nullptr;
  CUptiResult (*enable)(CUpti_ActivityKind) = nullptr;
  CUptiResult (*next_record)(uint8_t*, size_t, CUpti_Activity**) = nullptr;
  CUptiResult (*flush_all)(uint32_t) = nullptr;
  // The records are read as this header's CUpti_ActivityKernel10: a CUPTI of another major version lays them
  // out differently, and its numbers would be wrong, so such a library is refused.
  bool load() {
    void* h = nullptr;
    for (const char* name : {"libcupti.so", LLMQ_CUPTI_PATH})
      if (*name && (h = dlopen(name, RTLD_NOW | RTLD_LOCAL))) break;
    if (!h) return false;
    auto version = reinterpret_cast<CUptiResult (*)(uint32_t*)>(dlsym(h, "cuptiGetVersion"));
    uint32_t v = 0;
    if (!version || version(&v) != CUPTI_SUCCESS || v / 10000 != CUPTI_API_VERSION / 10000) {
      std::fprintf(stderr, "llmq: note: LLMQ_CUDA_TRACE: CUPTI API version %u, built for %u\n", v, unsigned(CUPTI_API_VERSION));
      return false;
    }
    register_callbacks = reinterpret_cast<decltype(register_callbacks)>(dlsym(h, "cuptiActivityRegisterCallbacks"));
    enable = reinterpret_cast<decltype(enable)>(dlsym(h, "cuptiActivityEnable"));
    next_record = reinterpret_cast<decltype(next_record)>(dlsym(h, "cuptiActivityGetNextRecord"));
    flush_all = reinterpret_cast<decltype(flush_all)>(dlsym(h, "cuptiActivityFlushAll"));
    return register_callbacks && enable && next_record && flush_all;
  }
};
Cupti cupti;

constexpr size_t kBufferBytes = size_t(8) << 20;

void CUPTIAPI buffer_requested(uint8_t** buffer, size_t* size, size_t* max_records) {
  *buffer = static_cast<uint8_t*>(std::aligned_alloc(8, kBufferBytes));
  *size = *buffer ? kBufferBytes : 0;
  *max_records = 0;
}

void CUPTIAPI buffer_completed(CUcontext, uint32_t, uint8_t* buffer, size_t, size_t valid) {
  CUpti_Activity* r = nullptr;
  std::vector<Rec> got;
  while (cupti.next_record(buffer, valid, &r) == CUPTI_SUCCESS) {
    if (r->kind != CUPTI_ACTIVITY_KIND_CONCURRENT_KERNEL && r->kind != CUPTI_ACTIVITY_KIND_KERNEL) continue;
    const auto* k = reinterpret_cast<const CUpti_ActivityKernel10*>(r);
    got.push_back({k->name, k->start, k->end, k->graphId, k->graphNodeId});
  }
  std::free(buffer);
  std::lock_guard<std::mutex> lock(mu);
  recs.insert(recs.end(), got.begin(), got.end());
}

// "llmq::cuda::(anonymous namespace)::gemv_vec_kernel<(llmq::cuda::WFmt)0, ...>(llmq::cuda::GemvArgs)" ->
// "gemv_vec_kernel<(WFmt)0, ...>", at most 60 characters.
std::string short_name(const char* mangled) {
  static std::map<const char*, std::string> memo;
  auto it = memo.find(mangled);
  if (it != memo.end()) return it->second;
  int status = 0;
  char* d = abi::__cxa_demangle(mangled, nullptr, nullptr, &status);
  std::string s = status == 0 && d ? d : mangled;
  std::free(d);
  for (const char* cut : {"(anonymous namespace)::", "llmq::cuda::"})
    for (size_t p; (p = s.find(cut)) != std::string::npos;) s.erase(p, std::string(cut).size());
  int depth = 0;
  for (size_t i = 0; i < s.size(); ++i) {
    if (s[i] == '<') ++depth;
    else if (s[i] == '>') --depth;
    else if (s[i] == '(' && depth == 0 && i > 0) {
      s.resize(i);
      break;
    }
  }
  if (s.size() > 60) s = s.substr(0, 57) + "...";
  return memo[mangled] = s;
}

double median(std::vector<double> v) {
  if (v.empty()) return 0;
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

void report_graph(uint32_t graph, std::vector<Rec>& rs) {
  std::sort(rs.begin(), rs.end(), [](const Rec& a, const Rec& b) { return a.start < b.start; });
  // Replays in start order: a node seen twice begins the next replay (a replay runs each node once, and the
  // replays of one stream do not overlap).
  std::vector<std::vector<const Rec*>> runs(1);
  std::map<uint64_t, bool> seen;
  for (const Rec& r : rs) {
    if (seen[r.node]) {
      runs.emplace_back();
      seen.clear();
    }
    seen[r.node] = true;
    runs.back().push_back(&r);
  }
  // Only replays with every node (the first may be cut by the trace's start).
  size_t nodes = 0;
  for (auto& run : runs) nodes = std::max(nodes, run.size());
  runs.erase(std::remove_if(runs.begin(), runs.end(), [&](auto& run) { return run.size() != nodes; }), runs.end());
  if (runs.size() < 8) return;
  std::vector<double> span, busy;
  // Per node: durations, gaps from the previous kernel's end, and what it adds (end minus the previous end),
  // in us. With PDL a kernel starts early and waits, so its duration overstates it; what it adds does not.
  struct NodeTimes {
    std::vector<double> dur, gap, adds;
  };
  std::map<uint64_t, NodeTimes> per_node;
  std::map<std::string, std::pair<int, std::vector<double>>> per_name;                // per replay: count, us
  for (auto& run : runs) {
    double b = 0;
    std::map<std::string, double> by_name;
    for (size_t i = 0; i < run.size(); ++i) {
      const double dur = double(run[i]->end - run[i]->start) * 1e-3;
      const double gap = i ? (double(run[i]->start) - double(run[i - 1]->end)) * 1e-3 : 0.0;
      NodeTimes& nt = per_node[run[i]->node];
      nt.dur.push_back(dur);
      nt.gap.push_back(gap);
      nt.adds.push_back(i ? (double(run[i]->end) - double(run[i - 1]->end)) * 1e-3 : dur);
      by_name[short_name(run[i]->name)] += dur;
      b += dur;
    }
    for (auto& [n, us] : by_name) per_name[n].second.push_back(us);
    span.push_back(double(run.back()->end - run.front()->start) * 1e-3);
    busy.push_back(b);
  }
  for (const Rec* r : runs[0]) per_name[short_name(r->name)].first++;
  std::fprintf(stderr, "llmq: trace: graph %u, %zu kernels, %zu replays: median span %.1f us, kernels' own time %.1f us\n",
               graph, nodes, runs.size(), median(span), median(busy));
  std::fprintf(stderr, "  %-60s %6s %10s %8s\n", "kernel (per replay)", "count", "us", "%span");
  std::vector<std::pair<double, std::string>> order;
  for (auto& [n, v] : per_name) order.push_back({median(v.second), n});
  std::sort(order.rbegin(), order.rend());
  for (auto& [us, n] : order)
    std::fprintf(stderr, "  %-60s %6d %10.1f %7.1f%%\n", n.c_str(), per_name[n].first, us, 100 * us / median(span));
  if (nodes > 96) return;
  std::fprintf(stderr, "  %4s %-60s %9s %9s %9s\n", "node", "kernel, in order", "us", "gap us", "adds us");
  for (size_t i = 0; i < nodes; ++i) {
    const Rec* r = runs[0][i];
    const NodeTimes& nt = per_node[r->node];
    std::fprintf(stderr, "  %4zu %-60s %9.2f %9.2f %9.2f\n", i, short_name(r->name).c_str(), median(nt.dur),
                 median(nt.gap), median(nt.adds));
  }
}

}  // namespace

void trace_start() {
  std::lock_guard<std::mutex> lock(mu);
  if (started) return;
  if (!cupti.load()) {
    std::fprintf(stderr, "llmq: note: LLMQ_CUDA_TRACE: no usable libcupti.so (CUDA toolkit) on the library path; "
                         "nothing is traced\n");
    return;
  }
  if (cupti.register_callbacks(buffer_requested, buffer_completed) != CUPTI_SUCCESS ||
      cupti.enable(CUPTI_ACTIVITY_KIND_CONCURRENT_KERNEL) != CUPTI_SUCCESS) {
    std::fprintf(stderr, "llmq: note: LLMQ_CUDA_TRACE: CUPTI refused to record kernels; nothing is traced\n");
    return;
  }
  started = true;
}

void trace_report() {
  if (!started) return;
  cupti.flush_all(1);
  std::vector<Rec> all;
  {
    std::lock_guard<std::mutex> lock(mu);
    all.swap(recs);
  }
  std::map<uint32_t, std::vector<Rec>> graphs;
  std::map<std::string, std::vector<double>> eager;
  for (const Rec& r : all) {
    if (r.graph) graphs[r.graph].push_back(r);
    else eager[short_name(r.name)].push_back(double(r.end - r.start) * 1e-3);
  }
  std::fprintf(stderr, "llmq: trace (CUPTI kernel records, %zu kernels)\n", all.size());
  for (auto& [g, rs] : graphs) report_graph(g, rs);
  if (eager.empty()) return;
  std::fprintf(stderr, "llmq: trace: kernels outside graphs\n  %-60s %6s %10s %10s\n", "kernel", "calls", "total ms",
               "median us");
  std::vector<std::pair<double, std::string>> order;
  for (auto& [n, v] : eager) {
    double t = 0;
    for (double x : v) t += x;
    order.push_back({t, n});
  }
  std::sort(order.rbegin(), order.rend());
  for (auto& [t, n] : order)
    std::fprintf(stderr, "  %-60s %6zu %10.3f %10.2f\n", n.c_str(), eager[n].size(), t * 1e-3, median(eager[n]));
}

#endif

}  // namespace llmq::cuda
