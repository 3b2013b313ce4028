// Ctrl-C for long CPU loops. The kernels are plain C++ (they also build into the
// libtorch-only library of CMakeLists.txt), so the Python module installs the
// check (PyErr_CheckSignals under the GIL) as a hook; without it nothing is polled.
// Only the thread that called the operator polls (Python handles signals on its
// main thread only, and a worker taking the GIL could deadlock); the others see
// the flag it sets. An interrupted kernel throws "spectral_ext: interrupted",
// which the Python wrappers turn back into KeyboardInterrupt.
#pragma once
#include <c10/util/Exception.h>

#include <atomic>
#include <chrono>
#include <thread>

namespace spectral_ext {

using InterruptHook = bool (*)();

inline std::atomic<InterruptHook>& interrupt_hook() {
  static std::atomic<InterruptHook> hook{nullptr};
  return hook;
}

class InterruptPoll {
 public:
  // True once an interrupt was seen. Cheap to call often: the hook runs at most
  // every 20 ms, from the calling thread.
  bool interrupted() {
    if (stop_.load(std::memory_order_relaxed)) return true;
    if (std::this_thread::get_id() != caller_) return false;
    const auto now = std::chrono::steady_clock::now();
    if (now - last_ < std::chrono::milliseconds(20)) return false;
    last_ = now;
    const InterruptHook hook = interrupt_hook().load(std::memory_order_relaxed);
    if (hook != nullptr && hook()) stop_.store(true, std::memory_order_relaxed);
    return stop_.load(std::memory_order_relaxed);
  }
  void throw_if_interrupted() const {
    TORCH_CHECK(!stop_.load(std::memory_order_relaxed), "spectral_ext: interrupted");
  }

 private:
  std::thread::id caller_ = std::this_thread::get_id();
  std::chrono::steady_clock::time_point last_ = std::chrono::steady_clock::now();
  std::atomic<bool> stop_{false};
};

}  // namespace spectral_ext
