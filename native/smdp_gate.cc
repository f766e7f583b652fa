// smdp-gate: the native data plane of the SMDP sidecar.
//
// A gRPC server speaking Triton's inference.GRPCInferenceService in front of Triton. ModelInfer for a
// model with a policy is gated: bounded queue by priority level, one in-flight slot per model
// instance, the policy table applied at every decision epoch, the chosen batch sent to Triton as one
// merged request and the answer split back. ModelStreamInfer requests for such a model are gated the
// same way and answered in-band on their stream; the stream's other requests (decoupled or sequence
// models, models without a policy) go to Triton unchanged on one upstream stream. Every other RPC is
// relayed as raw bytes with the caller's metadata and deadline, and Triton's status comes back.
// Health and reflection are answered here. Every call, and every call to Triton, runs on one
// completion queue drained by one thread (below, "how calls reach the gate's code").
//
// Why C++: a Python gRPC hop costs ~1 ms at low load on two shared cores, so a Python gate cannot
// add less latency than a Python pass-through proxy. The control plane stays in Python
// (plugin/native_plane.py): it solves policies and pushes them on this process's stdin, and reads
// arrivals and batch completions from its stdout for the rate estimator and the profile learner.
//
// stdin (one command per line):
//   policy MODEL max_batch=B table=a0,a1,... [beyond=b] [busy_tables=...] [max_wait_us=U guard_reason=R]
//          [hold_us=H] [slots=K] [max_queue=Q] [default_priority=L] [priority_levels=P] [dispatch_priority=D]
//   check FIELDS          (a policy's fields parsed and installed nowhere: `ok check`, or `error` naming
//                          what this build does not know; the control plane asks at start)
//   forget MODEL          (relay the model ungated from now on)
//   report                (report now, then print `reported`: the control plane's barrier)
//   quit                  (also on end of input: drain and stop)
// flags: --listen HOST:PORT --upstream HOST:PORT [--max-queue N] [--report-interval-ms MS]
//        [--upstream-timeout-ms MS] [--deny METHOD]...
// MODEL is percent-encoded both ways (Quote: bytes outside printable ASCII, space and '%' as %XX), and
// so is an error's MESSAGE: names are the client's to choose and must never break a line or a field.
// stdout (one event per line; times are CLOCK_MONOTONIC seconds, Python's time.monotonic()):
//   listening PORT
//   ok policy MODEL | error MESSAGE
//   seen MODEL            (a request for a model without a policy, relayed ungated; at most once a second)
//   lost MODEL            (Triton answered NOT_FOUND for a gated model: its config must be read again)
//   loaded MODEL          (a RepositoryModelLoad/Unload of MODEL through the gate succeeded: read it again)
//   arrive MODEL T1 T2 ...
//   batches MODEL SIZES ROWS ELAPSED CODES WHYS WAITS   (the batches completed since the last report, one
//            line per model and report, each field a comma-separated column in completion order: members,
//            rows, dispatch-to-answer seconds, gRPC status code number, why it was served (policy, or the
//            guard's reason); WAITS: every member's wait in the gate before its batch went out, seconds,
//            batch after batch, so it has the sum of SIZES entries)
//   counters MODEL submitted=.. rejected=.. cancelled=.. expired=.. batches=.. requests=.. held=.. queue=.. in_flight=..
//            invalid=..   (when something changed since the last report)
#include <absl/synchronization/mutex.h>
#include <google/protobuf/descriptor.h>
#include <google/protobuf/stubs/logging.h>
#include <grpcpp/generic/async_generic_service.h>
#include <grpcpp/generic/generic_stub.h>
#include <grpcpp/grpcpp.h>
#include <grpcpp/impl/codegen/proto_utils.h>
#ifdef SMDP_CALLBACK_SERVER
#include <grpcpp/ext/proto_server_reflection_plugin.h>
#include <grpcpp/health_check_service_interface.h>
#include <grpcpp/impl/codegen/server_callback_handlers.h>
#else
#include "grpc_health/v1/health.pb.h"
#include "grpc_reflection/v1alpha/reflection.pb.h"
#endif
#include <signal.h>
#include <time.h>

#include <atomic>
#include <climits>
#include <cstdlib>
#include <condition_variable>
#include <cstdio>
#include <deque>
#include <functional>
#include <iostream>
#include <map>
#include <memory>
#include <mutex>
#include <set>
#include <sstream>
#include <utility>
#include <string>
#include <thread>
#include <unordered_map>
#include <vector>

#include "gate_core.h"
#include "grpc_service.pb.h"
#include "merge.h"

namespace smdp {
namespace {

const char kInfer[] = "/inference.GRPCInferenceService/ModelInfer";
const char kStreamInfer[] = "/inference.GRPCInferenceService/ModelStreamInfer";
const char kRepositoryLoad[] = "/inference.GRPCInferenceService/RepositoryModelLoad";
const char kRepositoryUnload[] = "/inference.GRPCInferenceService/RepositoryModelUnload";
// Triton's answer (INTERNAL) to a ModelInfer whose bytes do not parse (invalid UTF-8 in a string too).
const char kUnparsable[] = "Unable to parse request";

double Now() {
  timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return ts.tv_sec + ts.tv_nsec * 1e-9;
}

// libprotobuf logs an ERROR for every request with invalid UTF-8 in a string field: a client could
// fill the log. Its messages are passed on once a minute at most, with how many there were.
void ProtobufLog(google::protobuf::LogLevel level, const char* file, int line, const std::string& message) {
  static std::mutex mu;
  static double last = -1e18;
  static uint64_t count = 0;
  std::lock_guard<std::mutex> lock(mu);
  ++count;
  const double now = Now();
  if (level < google::protobuf::LOGLEVEL_FATAL && now - last < 60.0) return;
  std::fprintf(stderr, "libprotobuf %s:%d: %s (%llu such message(s) in the last minute at most)\n", file, line,
               message.c_str(), static_cast<unsigned long long>(count));
  std::fflush(stderr);
  last = now;
  count = 0;
}

// Everything for the control plane goes through one writer thread: a control plane that reads slowly
// (or not at all) must never block a request, a decision or a timer, only delay its own news. The
// queue is bounded; past the bound, reports are dropped and the loss itself is reported (`dropped N`).
class Output {
 public:
  static constexpr size_t kMaxLines = 200000;

  void Push(std::string line) {
    std::lock_guard<std::mutex> lock(mu_);
    if (lines_.size() >= kMaxLines) {
      ++dropped_;
      return;
    }
    if (dropped_ > 0) {
      lines_.push_back("dropped " + std::to_string(dropped_));
      dropped_ = 0;
    }
    lines_.push_back(std::move(line));
    cv_.notify_one();
  }

  // The writer: until Close() and everything queued is written.
  void Run() {
    std::vector<std::string> batch;
    while (true) {
      {
        std::unique_lock<std::mutex> lock(mu_);
        cv_.wait(lock, [this] { return !lines_.empty() || closed_; });
        if (lines_.empty() && closed_) return;
        batch.assign(std::make_move_iterator(lines_.begin()), std::make_move_iterator(lines_.end()));
        lines_.clear();
      }
      for (const auto& line : batch) {
        std::fwrite(line.data(), 1, line.size(), stdout);
        std::fputc('\n', stdout);
      }
      std::fflush(stdout);
    }
  }

  void Close() {
    std::lock_guard<std::mutex> lock(mu_);
    closed_ = true;
    cv_.notify_one();
  }

 private:
  std::mutex mu_;
  std::condition_variable cv_;
  std::deque<std::string> lines_;
  uint64_t dropped_ = 0;
  bool closed_ = false;
};

Output g_out;
void Emit(std::string line) { g_out.Push(std::move(line)); }

#ifdef SMDP_TRACE
// Temporary latency trace (make -C native trace): per unary call, the times of its read, dispatch
// to Triton, Triton's answer, the reply and gRPC's OnDone, dumped to $SMDP_TRACE_FILE at exit.
struct TraceRecord { double t[5]; };
constexpr size_t kTraceMax = 1 << 20;
TraceRecord* g_trace = new TraceRecord[kTraceMax];
std::atomic<size_t> g_trace_n{0};
void TraceDump() {
  const char* path = std::getenv("SMDP_TRACE_FILE");
  if (path == nullptr) return;
  FILE* f = std::fopen(path, "w");
  if (f == nullptr) return;
  size_t n = std::min(g_trace_n.load(), kTraceMax);
  for (size_t i = 0; i < n; ++i)
    std::fprintf(f, "%.9f %.9f %.9f %.9f %.9f\n", g_trace[i].t[0], g_trace[i].t[1], g_trace[i].t[2], g_trace[i].t[3],
                 g_trace[i].t[4]);
  std::fclose(f);
}
#define TRACE_AT(member, i) ((member)->trace_[i] = Now())
#else
#define TRACE_AT(member, i) ((void)(member))
#endif

// Model names are the client's to choose, and they reach the control plane in reports: on the wire
// every name (and every error message) is percent-encoded, so that no byte of it can end a line or a
// field. Bytes outside printable ASCII, space and '%' become %XX (plugin/native_plane.py decodes).
std::string Quote(const std::string& s) {
  static const char kHex[] = "0123456789ABCDEF";
  std::string out;
  out.reserve(s.size());
  for (unsigned char c : s) {
    if (c > 0x20 && c < 0x7f && c != '%') {
      out.push_back(static_cast<char>(c));
    } else {
      out.push_back('%');
      out.push_back(kHex[c >> 4]);
      out.push_back(kHex[c & 0xf]);
    }
  }
  return out;
}

// The inverse of Quote; false for a malformed field (a '%' not followed by two hex digits).
bool Unquote(const std::string& s, std::string* out) {
  auto hex = [](char c) -> int {
    if (c >= '0' && c <= '9') return c - '0';
    if (c >= 'A' && c <= 'F') return c - 'A' + 10;
    if (c >= 'a' && c <= 'f') return c - 'a' + 10;
    return -1;
  };
  out->clear();
  for (size_t i = 0; i < s.size(); ++i) {
    if (s[i] != '%') {
      out->push_back(s[i]);
      continue;
    }
    if (i + 2 >= s.size()) return false;
    int hi = hex(s[i + 1]), lo = hex(s[i + 2]);
    if (hi < 0 || lo < 0) return false;
    out->push_back(static_cast<char>(hi * 16 + lo));
    i += 2;
  }
  return true;
}

// Whether a name can be a model in a Triton repository at all (a directory or object-store key):
// 1 to 1024 bytes, no control characters. Requests for other names are relayed to Triton ungated
// (Triton gives them its own answer) and never reported (plugin/model_names.py holds the same rule).
constexpr size_t kMaxModelName = 1024;
bool PlausibleModelName(const std::string& name) {
  if (name.empty() || name.size() > kMaxModelName) return false;
  for (unsigned char c : name)
    if (c < 0x20 || c == 0x7f) return false;
  return true;
}

// The caller's metadata that is forwarded to Triton (not the transport's own keys).
std::vector<std::pair<std::string, std::string>> ForwardedMetadata(const grpc::ServerContextBase& from) {
  std::vector<std::pair<std::string, std::string>> out;
  for (const auto& [k, v] : from.client_metadata()) {
    std::string key(k.data(), k.size());
    if (key.empty() || key[0] == ':' || key.rfind("grpc-", 0) == 0 || key == "user-agent" || key == "te" ||
        key == "content-type")
      continue;
    out.emplace_back(std::move(key), std::string(v.data(), v.size()));
  }
  return out;
}

// The caller's metadata (and, unless told otherwise, its deadline) on the call to Triton.
void CopyMetadata(const grpc::ServerContextBase& from, grpc::ClientContext* to, bool deadline = true) {
  for (auto& [k, v] : ForwardedMetadata(from)) to->AddMetadata(k, v);
  if (deadline && from.deadline() != std::chrono::system_clock::time_point::max()) to->set_deadline(from.deadline());
}

double g_upstream_timeout_s = 60.0;  // --upstream-timeout-ms: a gated call to Triton without a deadline of its own

// -- how calls reach the gate's code ------------------------------------------------------------
//
// By default every call, the calls to Triton included, runs on one completion queue drained by one
// thread (the async API). gRPC C++ 1.51's callback API serves its callbacks from two "nexting"
// threads that hand the poller role to each other on every event (epoll1): ~12 context switches a
// request on cores shared with Triton and the client, the low-load tail of the hop. With one thread
// polling, nobody else can take the poller role: a request wakes the gate twice (its arrival,
// Triton's answer). The handlers below are written once against the reactor interface (StartRead,
// StartWrite, Finish, OnReadDone, ...), which the async adapters reproduce; `make -C native
// callback` builds the old callback-API server (-DSMDP_CALLBACK_SERVER) for comparison.
#ifdef SMDP_CALLBACK_SERVER
using Incoming = grpc::GenericCallbackServerContext;  // what a handler is made from
using ServerCallContext = grpc::GenericCallbackServerContext;
using ClientBidi = grpc::ClientBidiReactor<grpc::ByteBuffer, grpc::ByteBuffer>;

class ServerBidi : public grpc::ServerGenericBidiReactor {
 public:
  explicit ServerBidi(Incoming* ctx) : ctx_(ctx) {}
  ServerCallContext* context() const { return ctx_; }

 private:
  Incoming* ctx_;
};

// A unary call to Triton: `done` runs with its status once `response` is filled.
void CallUnary(grpc::GenericStub* stub, grpc::ClientContext* ctx, const std::string& method,
               const grpc::ByteBuffer* request, grpc::ByteBuffer* response, std::function<void(grpc::Status)> done) {
  stub->UnaryCall(ctx, method, grpc::StubOptions(), request, response, std::move(done));
}
#else
// An event on the completion queue: every tag put on it is one of these.
class Tag {
 public:
  virtual void Proceed(bool ok) = 0;

 protected:
  ~Tag() = default;
};

// A one-shot tag that runs `f(ok)` and frees itself.
class Then final : public Tag {
 public:
  explicit Then(std::function<void(bool)> f) : f_(std::move(f)) {}
  void Proceed(bool ok) override {
    auto f = std::move(f_);
    delete this;
    f(ok);
  }

 private:
  std::function<void(bool)> f_;
};
void* Tagged(std::function<void(bool)> f) { return static_cast<Tag*>(new Then(std::move(f))); }

grpc::CompletionQueue* g_cq = nullptr;  // the one queue: server calls and calls to Triton

// The one thread that polls: every handler below runs here (the gate's timer and control threads
// may also start operations: those complete here).
void Drain(grpc::CompletionQueue* cq) {
  void* tag = nullptr;
  bool ok = false;
  while (cq->Next(&tag, &ok)) static_cast<Tag*>(tag)->Proceed(ok);
}

class ServerBidi;

// A call as the async generic service hands it over: its context, its stream, and the notification
// that it is over (finished, or cancelled by the caller), requested before the call is.
class Incoming final : public Tag {
 public:
  Incoming() { ctx.AsyncNotifyWhenDone(static_cast<Tag*>(this)); }
  void Proceed(bool) override;

  grpc::GenericServerContext ctx;
  grpc::GenericServerAsyncReaderWriter stream{&ctx};
  ServerBidi* owner = nullptr;
};
using ServerCallContext = grpc::GenericServerContext;

// The server side of a call, with the callback reactor's interface on the async API. OnDone runs
// once Finish was called, every operation completed and the done notification came: references
// held by the notification, by "not finished yet", and by each operation in flight.
class ServerBidi {
 public:
  explicit ServerBidi(Incoming* call) : call_(call) { call->owner = this; }
  virtual ~ServerBidi() { delete call_; }
  ServerCallContext* context() const { return &call_->ctx; }

  void StartRead(grpc::ByteBuffer* buf) {
    Hold();
    call_->stream.Read(buf, Tagged([this](bool ok) {
      OnReadDone(ok);
      Drop();
    }));
  }
  void StartWrite(const grpc::ByteBuffer* buf) {
    Hold();
    call_->stream.Write(*buf, Tagged([this](bool ok) {
      OnWriteDone(ok);
      Drop();
    }));
  }
  void StartWriteAndFinish(const grpc::ByteBuffer* buf, grpc::WriteOptions options, const grpc::Status& status) {
    Hold();
    call_->stream.WriteAndFinish(*buf, options, status, Tagged([this](bool) { Drop(); }));
    Drop();  // finished
  }
  void Finish(const grpc::Status& status) {
    Hold();
    call_->stream.Finish(status, Tagged([this](bool) { Drop(); }));
    Drop();  // finished
  }

  virtual void OnReadDone(bool) {}
  virtual void OnWriteDone(bool) {}
  virtual void OnCancel() {}
  virtual void OnDone() = 0;

  void Over() {  // the done notification
    if (call_->ctx.IsCancelled()) OnCancel();
    Drop();
  }

 private:
  void Hold() { refs_.fetch_add(1); }
  void Drop() {
    if (refs_.fetch_sub(1) == 1) OnDone();
  }

  Incoming* call_;
  std::atomic<int> refs_{2};
};

void Incoming::Proceed(bool) { owner->Over(); }

// The client side of a bidi stream to Triton, with the callback reactor's interface on the async
// API. OnDone(status) runs once the stream ended (a read failed and Finish gave the status), every
// operation completed and every hold was removed.
class ClientBidi {
 public:
  virtual ~ClientBidi() = default;
  void Prepare(grpc::GenericStub* stub, grpc::ClientContext* ctx, const std::string& method) {
    call_ = stub->PrepareCall(ctx, method, g_cq);
  }
  // Reads may start at once; writes wait until the call has started (StartCall and Write share one
  // operation set in the async API: a write before StartCall completes is refused with an abort).
  void StartCall() {
    Hold();
    call_->StartCall(Tagged([this](bool) {
      const grpc::ByteBuffer* write = nullptr;
      bool writes_done = false;
      {
        std::lock_guard<std::mutex> lock(mu_);
        ready_ = true;
        write = std::exchange(write_backlog_, nullptr);
        writes_done = std::exchange(writes_done_backlog_, false);
      }
      if (write != nullptr) StartWrite(write);
      if (writes_done) StartWritesDone();
      Drop();
    }));
    started_ = true;
    if (backlog_ != nullptr) StartRead(std::exchange(backlog_, nullptr));
  }
  void StartRead(grpc::ByteBuffer* buf) {
    if (!started_) {  // as the callback API: a read asked for before the call starts waits for it
      backlog_ = buf;
      return;
    }
    Hold();
    call_->Read(buf, Tagged([this](bool ok) {
      if (!ok)  // the stream is over: its status (Finish's completion drops the first reference)
        call_->Finish(&status_, Tagged([this](bool) { Drop(); }));
      OnReadDone(ok);
      Drop();
    }));
  }
  void StartWrite(const grpc::ByteBuffer* buf) {  // one at a time, as with the callback API
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (!ready_) {
        write_backlog_ = buf;
        return;
      }
    }
    Hold();
    call_->Write(*buf, Tagged([this](bool ok) {
      OnWriteDone(ok);
      Drop();
    }));
  }
  void StartWritesDone() {  // after the last write completed
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (!ready_) {
        writes_done_backlog_ = true;
        return;
      }
    }
    Hold();
    call_->WritesDone(Tagged([this](bool) { Drop(); }));
  }
  void AddHold() { Hold(); }
  void RemoveHold() { Drop(); }

  virtual void OnReadDone(bool) {}
  virtual void OnWriteDone(bool) {}
  virtual void OnDone(const grpc::Status&) = 0;

 private:
  void Hold() { refs_.fetch_add(1); }
  void Drop() {
    if (refs_.fetch_sub(1) == 1) OnDone(status_);
  }

  std::unique_ptr<grpc::GenericClientAsyncReaderWriter> call_;
  grpc::Status status_;
  grpc::ByteBuffer* backlog_ = nullptr;  // a read asked for before StartCall
  bool started_ = false;
  std::mutex mu_;
  bool ready_ = false;  // StartCall completed: writes may go
  const grpc::ByteBuffer* write_backlog_ = nullptr;
  bool writes_done_backlog_ = false;
  std::atomic<int> refs_{1};  // released when Finish has the status
};

// A unary call to Triton: `done` runs with its status once `response` is filled.
class UnaryCallTag final : public Tag {
 public:
  explicit UnaryCallTag(std::function<void(grpc::Status)> done) : done_(std::move(done)) {}
  void Proceed(bool) override {
    auto done = std::move(done_);
    grpc::Status status = std::move(status_);
    delete this;
    done(std::move(status));
  }
  std::unique_ptr<grpc::GenericClientAsyncResponseReader> rpc_;
  grpc::Status status_;

 private:
  std::function<void(grpc::Status)> done_;
};

void CallUnary(grpc::GenericStub* stub, grpc::ClientContext* ctx, const std::string& method,
               const grpc::ByteBuffer* request, grpc::ByteBuffer* response, std::function<void(grpc::Status)> done) {
  auto* t = new UnaryCallTag(std::move(done));
  t->rpc_ = stub->PrepareUnaryCall(ctx, method, *request, g_cq);
  t->rpc_->StartCall();
  t->rpc_->Finish(response, &t->status_, static_cast<Tag*>(t));
}
#endif

class Service;

// One gated request: a unary ModelInfer call, or one request of a ModelStreamInfer stream. The gate
// queues, batches and answers members; how an answer reaches the caller is the subclass's business.
class Member {
 public:
  virtual ~Member() = default;
  // Answer exactly once, whatever path gets here first. The member may be freed once this returns.
  virtual void Reply(const grpc::ByteBuffer* response, const grpc::Status& status) = 0;
  // The caller's deadline (max: none) and metadata, for the call to Triton.
  virtual std::chrono::system_clock::time_point Deadline() const = 0;
  virtual void AddMetadataTo(grpc::ClientContext* to) const = 0;

  grpc::ByteBuffer in_;   // the caller's bytes, relayed unchanged when the request goes alone
  inference::ModelInferRequest req_;
  Pending<Member*> pending_;
  struct ModelState* model_ = nullptr;
  struct Batch* batch_ = nullptr;  // set while dispatched (guarded by the model's mutex)
  bool has_timeout_ = false;
  bool has_priority_ = false;
#ifdef SMDP_TRACE
  double trace_[5] = {0, 0, 0, 0, 0};
#endif
};

// One gated ModelInfer call. Deleted by gRPC after Finish (OnDone); the gate never holds it past that.
class InferCall : public ServerBidi, public Member {
 public:
  InferCall(Service* svc, Incoming* in) : ServerBidi(in), svc_(svc) { StartRead(&in_); }
  void OnReadDone(bool ok) override;
  void OnWriteDone(bool) override {}
  void OnCancel() override;
  void OnDone() override {
#ifdef SMDP_TRACE
    TRACE_AT(this, 4);
    size_t i = g_trace_n.fetch_add(1);
    if (i < kTraceMax) std::copy(trace_, trace_ + 5, g_trace[i].t);
#endif
    delete this;
  }

  void Reply(const grpc::ByteBuffer* response, const grpc::Status& status) override {
    if (answered_.exchange(true)) return;
    if (response != nullptr && status.ok())
      StartWriteAndFinish(response, grpc::WriteOptions(), status);
    else
      Finish(status);
  }
  std::chrono::system_clock::time_point Deadline() const override { return context()->deadline(); }
  void AddMetadataTo(grpc::ClientContext* to) const override { CopyMetadata(*context(), to, /*deadline=*/false); }

 private:
  Service* svc_;
  std::atomic<bool> answered_{false};
};

class StreamCall;

// One request of a ModelStreamInfer stream for a gated model: answered in-band on its stream, as
// Triton answers stream requests (a ModelStreamInferResponse, with error_message on failure).
class StreamMember : public Member {
 public:
  explicit StreamMember(StreamCall* stream) : stream_(stream) {}
  void Reply(const grpc::ByteBuffer* response, const grpc::Status& status) override;
  std::chrono::system_clock::time_point Deadline() const override;
  void AddMetadataTo(grpc::ClientContext* to) const override;

 private:
  StreamCall* stream_;
  std::atomic<bool> answered_{false};
};

// A completed batch as the next report tells it (numbers only: formatted off the request path).
struct BatchRecord {
  int size;
  int rows;
  double elapsed;  // dispatch to answer, seconds
  int code;        // gRPC status code number
  const char* reason;
};

struct ModelState {
  std::string name;
  std::string wire;  // the name as reports carry it (Quote)
  std::mutex mu;
  std::unique_ptr<ModelGate<Member*>> gate;  // null: relayed ungated
  int default_priority = 0, priority_levels = 0, dispatch_priority = 0;
  uint64_t invalid = 0;  // refused for a bad priority or timeout parameter (INVALID_ARGUMENT)
  bool forgetting = false;     // `forget`: drop the gate once what it holds is answered
  bool lost_reported = false;  // `lost` sent since the last policy
  std::vector<double> arrivals;  // not yet reported
  std::string last_counters;     // the last counters line reported
  std::vector<BatchRecord> batches;  // completed batches not yet reported
  std::vector<double> batch_waits;   // their members' waits, batch after batch
};

struct Batch {
  ModelState* model;
  std::vector<Member*> members;
  std::vector<const inference::ModelInferRequest*> requests;  // the members' requests, in order
  std::vector<int> member_rows;                                // and their rows, for merge and split
  grpc::ClientContext ctx;
  grpc::ByteBuffer request, response;
  double start = 0;
  int rows = 0;
  const char* reason = "policy";  // why the gate served it: policy, or the guard's reason
};

// Relays one unary RPC as raw bytes.
class UnaryRelay : public ServerBidi {
 public:
  UnaryRelay(grpc::GenericStub* stub, Incoming* in) : ServerBidi(in), stub_(stub), sctx_(context()) {
    StartRead(&req_);
  }
  void OnReadDone(bool ok) override {
    if (!ok) {
      Finish(grpc::Status(grpc::StatusCode::CANCELLED, "no request message"));
      return;
    }
    CopyMetadata(*sctx_, &cctx_);
    const std::string& m = sctx_->method();
    const bool repository = m == kRepositoryLoad || m == kRepositoryUnload;
    if (repository) loaded_ = req_;  // (a reference to the same bytes)
    CallUnary(stub_, &cctx_, m, &req_, &resp_, [this, repository](grpc::Status s) {
      if (s.ok() && repository) ReportLoaded();
      if (s.ok())
        StartWriteAndFinish(&resp_, grpc::WriteOptions(), s);
      else
        Finish(s);
    });
  }
  // Triton loaded (or unloaded) a model through the gate: `loaded MODEL`, the control plane reads its
  // config again (a reload may change what the gate must know, max_batch_size say).
  void ReportLoaded() {
    inference::RepositoryModelLoadRequest r;  // same fields, same numbers as RepositoryModelUnloadRequest
    if (grpc::SerializationTraits<inference::RepositoryModelLoadRequest>::Deserialize(&loaded_, &r).ok() &&
        PlausibleModelName(r.model_name()))
      Emit("loaded " + Quote(r.model_name()));
  }
  void OnCancel() override { cctx_.TryCancel(); }
  void OnDone() override { delete this; }

 private:
  grpc::GenericStub* stub_;
  ServerCallContext* sctx_;
  grpc::ClientContext cctx_;
  grpc::ByteBuffer req_, resp_, loaded_;
};

// Answers a method the operator has not exposed with PERMISSION_DENIED.
class Refusal : public ServerBidi {
 public:
  Refusal(Incoming* in, const std::string& why) : ServerBidi(in) {
    Finish(grpc::Status(grpc::StatusCode::PERMISSION_DENIED, why));
  }
  void OnDone() override { delete this; }
};

// One ModelStreamInfer stream. Each request for a gated model goes through the gate as a unary call
// would, and its answer (or error, in-band as Triton reports stream errors) is written back in
// completion order, matched by the request's id as Triton's own streams are. Requests for other
// models (decoupled, sequence, or not gated yet) are relayed unchanged on one upstream stream to
// Triton, opened with the first of them, and every response it sends is passed on.
//
// Lifetime: the stream outlives its gRPC reactor while members it queued are still being served
// (their answers are then dropped): a reference count, one for the reactor, one per live member and
// one for the upstream stream; whoever drops the last deletes it. `members_mu_` (recursive) keeps a
// member alive while the stream withdraws it from its gate (the withdrawal answers it re-entrantly).
class StreamCall : public ServerBidi {
 public:
  StreamCall(Service* svc, grpc::GenericStub* stub, Incoming* in);
  void OnReadDone(bool ok) override;
  void OnWriteDone(bool ok) override;
  void OnCancel() override { Abandon(grpc::Status(grpc::StatusCode::CANCELLED, "the stream was cancelled")); }
  void OnDone() override { Release(); }

  void Deliver(StreamMember* m, const grpc::ByteBuffer* response, const grpc::Status& status);
  std::chrono::system_clock::time_point deadline() const { return deadline_; }
  void AddMetadataTo(grpc::ClientContext* to) const {
    for (const auto& [k, v] : metadata_) to->AddMetadata(k, v);
  }

 private:
  struct Upstream : public ClientBidi {
    explicit Upstream(StreamCall* s) : stream(s) {}
    void OnReadDone(bool ok) override {
      if (!ok) return;  // the stream ended: OnDone says how
      stream->Write(grpc::ByteBuffer(in));  // Triton's ModelStreamInferResponse, passed on as is
      StartRead(&in);
    }
    void OnWriteDone(bool ok) override { stream->UpWriteDone(ok); }
    void OnDone(const grpc::Status& s) override { stream->UpDone(s); }
    StreamCall* stream;
    grpc::ClientContext cctx;
    grpc::ByteBuffer in;
  };

  void Write(grpc::ByteBuffer b);           // queue an answer for the caller
  void Pump();                              // start the next write to the caller, or finish
  void SendUp(const grpc::ByteBuffer& b);   // relay a request on the upstream stream
  void UpPump();                            // start the next upstream write, or close its writes
  void UpWriteDone(bool ok);
  void UpDone(const grpc::Status& s);
  void Abandon(const grpc::Status& why);    // cancelled, or the upstream stream failed: end it now
  void Release() {
    if (refs_.fetch_sub(1) == 1) delete this;
  }

  Service* svc_;
  grpc::GenericStub* stub_;
  std::vector<std::pair<std::string, std::string>> metadata_;  // the caller's, for calls to Triton
  std::chrono::system_clock::time_point deadline_;
  std::atomic<int> refs_{1};
  grpc::ByteBuffer in_;
  std::recursive_mutex members_mu_;
  std::mutex mu_;  // everything below
  std::set<StreamMember*> members_;  // queued or in flight in a gate
  std::deque<grpc::ByteBuffer> out_;
  grpc::ByteBuffer writing_;
  bool write_busy_ = false, reads_done_ = false, abandoned_ = false, finished_ = false;
  bool read_starting_ = false, finish_deferred_ = false;
  grpc::Status end_;            // the stream's status once abandoned
  grpc::Status finish_status_;  // a deferred Finish's
  Upstream up_;
  std::deque<grpc::ByteBuffer> up_out_;
  grpc::ByteBuffer up_writing_;
  bool up_started_ = false, up_ready_ = false, up_busy_ = false, up_closed_ = false, up_done_ = true;
};

#ifdef SMDP_CALLBACK_SERVER
class Service : public grpc::CallbackGenericService {
#else
class Service {
#endif
 public:
  Service(std::shared_ptr<grpc::Channel> channel, const std::vector<std::string>& deny)
      : stub_(channel), infer_stub_(channel) {
    for (const auto& name : deny)
      denied_["/inference.GRPCInferenceService/" + name] =
          name + " is not exposed through the sidecar: to relay Triton's repository control, start it with "
                 "allow_repository_control: true in its config (or smdp serve --allow-repository-control)";
  }

  // The handler of a call to Triton's service (or relayed to Triton as it came), by its method.
  ServerBidi* Create(Incoming* in, const std::string& m) {
    if (m == kInfer) return new InferCall(this, in);
    if (m == kStreamInfer) return new StreamCall(this, &stub_, in);
    if (denied_.count(m)) return new Refusal(in, denied_.at(m));
    return new UnaryRelay(&stub_, in);
  }
#ifdef SMDP_CALLBACK_SERVER
  grpc::ServerGenericBidiReactor* CreateReactor(grpc::GenericCallbackServerContext* ctx) override {
    return Create(ctx, ctx->method());
  }
#endif

  // The state of a model the control plane has sent a policy (never created for a client's model
  // name alone: names are the client's to choose, and this map must not grow with them).
  ModelState* Find(const std::string& name) {
    std::lock_guard<std::mutex> lock(models_mu_);
    auto it = models_.find(name);
    return it == models_.end() ? nullptr : it->second.get();
  }

  ModelState* Model(const std::string& name) {
    std::lock_guard<std::mutex> lock(models_mu_);
    auto& slot = models_[name];
    if (!slot) {
      slot = std::make_unique<ModelState>();
      slot->name = name;
      slot->wire = Quote(name);
    }
    return slot.get();
  }

  std::vector<ModelState*> Models() {
    std::lock_guard<std::mutex> lock(models_mu_);
    std::vector<ModelState*> out;
    for (auto& [k, v] : models_) out.push_back(v.get());
    return out;
  }

  // Whether to report `seen NAME` for an ungated model now: once a second per name, so the control
  // plane retries a failed config read. Bounded: forgotten wholesale when full (a report too many).
  bool SeenDue(const std::string& name, double now) {
    std::lock_guard<std::mutex> lock(seen_mu_);
    if (seen_at_.size() >= 4096) seen_at_.clear();
    auto [it, fresh] = seen_at_.emplace(name, now);
    if (!fresh && now - it->second < 1.0) return false;
    it->second = now;
    return true;
  }

  // A parsed request arrives: queue it and make the decisions due. False when its model has no
  // gate (the control plane hears of it, `seen`): the caller relays it as it should go ungated, a
  // unary call alone (RelayAlone), a stream's request on the stream's upstream stream.
  bool Admit(Member* call) {
    const std::string& name = call->req_.model_name();
    ModelState* ms = Find(name);
    call->model_ = ms;
    const double now = Now();
    std::unique_lock<std::mutex> lock;
    if (ms != nullptr) lock = std::unique_lock<std::mutex>(ms->mu);
    if (ms == nullptr || !ms->gate) {
      if (lock) lock.unlock();
      // A name that cannot be a model is relayed for Triton's own answer, never reported.
      if (PlausibleModelName(name) && SeenDue(name, now)) Emit("seen " + Quote(name));
      return false;
    }
    std::string error;
    if (!ReadParameters(call, *ms, now, &error)) {
      ++ms->invalid;
      lock.unlock();
      call->Reply(nullptr, grpc::Status(grpc::StatusCode::INVALID_ARGUMENT, error));
      return true;
    }
    if (!ms->gate->Submit(&call->pending_)) {
      int q = ms->gate->queue_length();
      lock.unlock();
      call->Reply(nullptr, grpc::Status(grpc::StatusCode::RESOURCE_EXHAUSTED,
                                        "smdp gate: queue for model '" + ms->name + "' is full (" +
                                            std::to_string(q) + " requests waiting)"));
      return true;
    }
    ms->arrivals.push_back(now);  // accepted arrivals only, as the Python gate reports them
    Step<Member*> step = PollLocked(ms, now);
    lock.unlock();  // the step is carried out outside the model's lock
    Carry(ms, std::move(step));
    return true;
  }

  // A request sent to Triton as it came, ungated; answered like a batch of one.
  void RelayAlone(Member* call) {
    auto* b = new Batch();
    b->model = nullptr;
    b->members.push_back(call);
    b->start = Now();
    b->rows = 1;
    b->request = call->in_;
    call->AddMetadataTo(&b->ctx);
    if (call->Deadline() != std::chrono::system_clock::time_point::max()) b->ctx.set_deadline(call->Deadline());
    TRACE_AT(call, 1);
    CallUnary(&infer_stub_, &b->ctx, kInfer, &b->request, &b->response, [this, b](grpc::Status s) { Done(b, s); });
  }

  void Cancelled(Member* call) {
    ModelState* ms = call->model_;
    if (ms == nullptr) return;
    Step<Member*> step;
    bool withdrawn = false;
    {
      std::lock_guard<std::mutex> lock(ms->mu);
      if (ms->gate && ms->gate->Cancel(&call->pending_)) {
        withdrawn = true;
        step = PollLocked(ms, Now());  // n fell: a waiting decision may change
      } else if (call->batch_ != nullptr && call->batch_->members.size() == 1) {
        call->batch_->ctx.TryCancel();  // alone: Triton may drop it; merged batches run for the others
      }
    }
    if (withdrawn) {
      call->Reply(nullptr, grpc::Status(grpc::StatusCode::CANCELLED, "cancelled by the caller"));
      Carry(ms, std::move(step));
    }
  }

  // Apply a `policy` command (under the model's lock; waiting requests see it at the next decision).
  void SetPolicy(const std::string& name, const Policy& p, int slots, int max_queue, int default_priority,
                 int levels, int dispatch_priority) {
    ModelState* ms = Model(name);
    Step<Member*> step;
    {
      std::lock_guard<std::mutex> lock(ms->mu);
      ms->forgetting = false;
      ms->lost_reported = false;
      if (!ms->gate) {
        ms->gate = std::make_unique<ModelGate<Member*>>(p, slots, max_queue);
      } else {
        ms->gate->SetPolicy(p);
        ms->gate->SetSlots(slots);
        ms->gate->SetMaxQueue(max_queue);
      }
      ms->default_priority = default_priority;
      ms->priority_levels = levels;
      ms->dispatch_priority = dispatch_priority;
      step = PollLocked(ms, Now());
    }
    Carry(ms, std::move(step));
  }

  // Stop gating a model: what waits is dispatched at once, later arrivals are relayed alone.
  void Forget(const std::string& name) {
    ModelState* ms = Find(name);
    if (ms == nullptr) return;
    Step<Member*> step;
    {
      std::lock_guard<std::mutex> lock(ms->mu);
      if (!ms->gate) return;
      Policy greedy;
      greedy.max_batch = ms->gate->policy().max_batch;
      greedy.beyond = greedy.max_batch;
      greedy.table = {0, 1};
      ms->gate->SetPolicy(greedy);
      step = PollLocked(ms, Now());
      if (ms->gate->in_flight() == 0 && ms->gate->queue_length() == 0) ms->gate.reset();
      else ms->forgetting = true;  // dropped once what it holds is answered (Done)
    }
    Carry(ms, std::move(step));
  }

  // Timer thread: wake-ups the gates asked for, and the periodic report of arrivals and counters.
  // Sleeps until the next report or the earliest wake-up a decision asked for, whichever comes first:
  // an earlier wake-up, and the stop, notify it (both under timer_mu_, so neither is missed).
  void TimerLoop(double report_interval_s, std::atomic<bool>* stop) {
    double next_report = Now() + report_interval_s;
    while (!stop->load()) {
      double wake = next_report;
      {
        std::unique_lock<std::mutex> lock(timer_mu_);
        if (!wakeups_.empty()) wake = std::min(wake, wakeups_.begin()->first);
        double delay = wake - Now();
        if (delay > 0 && !stop->load()) timer_cv_.wait_for(lock, std::chrono::duration<double>(delay));
      }
      const double now = Now();
      std::vector<ModelState*> due;
      {
        std::lock_guard<std::mutex> lock(timer_mu_);
        while (!wakeups_.empty() && wakeups_.begin()->first <= now) {
          due.push_back(wakeups_.begin()->second);
          wakeups_.erase(wakeups_.begin());
        }
      }
      for (ModelState* ms : due) {
        Step<Member*> step;
        {
          std::lock_guard<std::mutex> lock(ms->mu);
          if (!ms->gate) continue;
          step = PollLocked(ms, now);
        }
        Carry(ms, std::move(step));
      }
      if (now >= next_report) {
        Report();
        next_report = now + report_interval_s;
      }
    }
    Report();
  }

  void Report() {
    for (ModelState* ms : Models()) {
      std::string arrive, counters;
      std::vector<BatchRecord> batches;
      std::vector<double> waits;
      {
        std::lock_guard<std::mutex> lock(ms->mu);
        batches.swap(ms->batches);
        waits.swap(ms->batch_waits);
        if (!ms->arrivals.empty()) {
          std::ostringstream os;
          os.precision(17);
          os << "arrive " << ms->wire;
          for (double t : ms->arrivals) os << ' ' << t;
          arrive = os.str();
          ms->arrivals.clear();
        }
        if (ms->gate) {
          const GateCounters& c = ms->gate->counters();
          std::ostringstream os;
          // (emitted only when something changed since the last report)
          os << "counters " << ms->wire << " submitted=" << c.submitted << " rejected=" << c.rejected
             << " cancelled=" << c.cancelled << " expired=" << c.expired << " batches=" << c.dispatched_batches
             << " requests=" << c.dispatched_requests << " held=" << c.decisions_held
             << " queue=" << ms->gate->queue_length()
             << " in_flight=" << ms->gate->in_flight() << " invalid=" << ms->invalid;
          counters = os.str();
          if (counters == ms->last_counters) counters.clear();
          else ms->last_counters = counters;
        }
      }
      if (!arrive.empty()) Emit(std::move(arrive));
      if (!batches.empty()) Emit(BatchesLine(ms->wire, batches, waits));
      if (!counters.empty()) Emit(std::move(counters));
    }
  }

  // One `batches` line: the control plane parses and books a report's batches column by column, so
  // its work per report does not grow with one line (and one event) per batch.
  static std::string BatchesLine(const std::string& wire, const std::vector<BatchRecord>& batches,
                                 const std::vector<double>& waits) {
    std::ostringstream os;
    os << "batches " << wire;
    char sep = ' ';
    for (const auto& b : batches) os << std::exchange(sep, ',') << b.size;
    sep = ' ';
    for (const auto& b : batches) os << std::exchange(sep, ',') << b.rows;
    sep = ' ';
    os.precision(9);
    for (const auto& b : batches) os << std::exchange(sep, ',') << b.elapsed;
    sep = ' ';
    for (const auto& b : batches) os << std::exchange(sep, ',') << b.code;
    sep = ' ';
    for (const auto& b : batches) os << std::exchange(sep, ',') << b.reason;
    sep = ' ';
    os.precision(6);
    for (double w : waits) os << std::exchange(sep, ',') << w;
    return os.str();
  }

  void StopTimer() {
    std::lock_guard<std::mutex> lock(timer_mu_);
    timer_cv_.notify_all();
  }

 private:
  // Priority level and deadline of a request, read the way Triton reads them.
  bool ReadParameters(Member* call, const ModelState& ms, double now, std::string* error) {
    Pending<Member*>& p = call->pending_;
    p = Pending<Member*>();
    p.payload = call;
    p.arrival = now;
    p.key = MergeKey(call->req_, &p.rows);
    p.priority = ms.default_priority;
    const auto& params = call->req_.parameters();
    auto it = params.find("priority");
    call->has_priority_ = it != params.end();
    if (call->has_priority_) {
      int64_t v;
      if (it->second.parameter_choice_case() == inference::InferParameter::kInt64Param) {
        v = it->second.int64_param();
        if (v < 0) {
          *error = "invalid value for 'priority', expected value >= 0.";
          return false;
        }
      } else if (it->second.parameter_choice_case() == inference::InferParameter::kUint64Param) {
        v = static_cast<int64_t>(std::min<uint64_t>(it->second.uint64_param(), INT32_MAX));
      } else {
        *error = "invalid value type for 'priority' parameter, expected int64_param or uint64_param.";
        return false;
      }
      if (v != 0 && ms.priority_levels > 0 && v <= ms.priority_levels) p.priority = static_cast<int>(v);
    }
    it = params.find("timeout");
    call->has_timeout_ = it != params.end();
    if (call->has_timeout_) {
      if (it->second.parameter_choice_case() != inference::InferParameter::kInt64Param) {
        *error = "invalid value type for 'timeout' parameter, expected int64_param.";
        return false;
      }
      if (it->second.int64_param() > 0) p.deadline = now + it->second.int64_param() * 1e-6;
    }
    // A gRPC deadline is not a gate deadline: gRPC cancels the call when it passes (OnCancel withdraws it).
    return true;
  }

  Step<Member*> PollLocked(ModelState* ms, double now) {
    Step<Member*> step = ms->gate->Poll(now);
    for (auto& members : step.batches) {
      auto* b = new Batch();
      b->model = ms;
      b->start = now;
      b->reason = step.reasons[&members - &step.batches[0]];
      for (auto* p : members) {
        b->members.push_back(p->payload);
        b->requests.push_back(&p->payload->req_);
        b->member_rows.push_back(p->rows);
        p->payload->batch_ = b;
        b->rows += p->rows;
      }
    }
    if (step.wake_at < std::numeric_limits<double>::infinity()) {
      std::lock_guard<std::mutex> lock(timer_mu_);
      wakeups_.emplace(step.wake_at, ms);
      timer_cv_.notify_all();
    }
    return step;
  }

  // Carry out a step outside the model's lock: answer the expired, send the batches.
  void Carry(ModelState* ms, Step<Member*> step) {
    for (auto* p : step.expired)
      p->payload->Reply(nullptr, grpc::Status(grpc::StatusCode::UNAVAILABLE, "Request timeout expired"));
    for (auto& members : step.batches) Send(members.front()->payload->batch_);
  }

  void Send(Batch* b) {
    Member* head = b->members.front();
    ModelState* ms = b->model;
    // The batch's call to Triton must not end before any member's own deadline: the latest one, and
    // none when a member has none (then the upstream timeout, as the Python plane's).
    head->AddMetadataTo(&b->ctx);
    auto latest = std::chrono::system_clock::time_point::min();
    for (auto* c : b->members) latest = std::max(latest, c->Deadline());
    auto bound = std::chrono::system_clock::now() +
                 std::chrono::duration_cast<std::chrono::system_clock::duration>(
                     std::chrono::duration<double>(g_upstream_timeout_s));
    b->ctx.set_deadline(std::min(latest, bound));
    const double now = Now();
    if (b->members.size() == 1 && !head->has_timeout_ && (head->has_priority_ || ms->dispatch_priority == 0)) {
      b->request = head->in_;  // alone and nothing to stamp: the caller's own bytes
    } else {
      inference::ModelInferRequest out;
      if (b->members.size() == 1) {
        out = head->req_;
        out.mutable_parameters()->erase("priority");
        out.mutable_parameters()->erase("timeout");
      } else {
        out = MergeRequests(b->requests, b->member_rows);
      }
      // A client's own priority is forwarded (the most urgent among the members); otherwise the gate's.
      int level = -1;
      double latest = 0;
      bool all_timeouts = true, any_timeout = false;
      for (auto* c : b->members) {
        if (c->has_priority_ && (level < 0 || c->pending_.priority < level)) level = c->pending_.priority;
        if (c->pending_.deadline == std::numeric_limits<double>::infinity()) all_timeouts = false;
        else latest = std::max(latest, c->pending_.deadline);
        any_timeout |= c->has_timeout_;
      }
      if (level < 0 && ms->dispatch_priority > 0 && ms->dispatch_priority <= ms->priority_levels)
        level = ms->dispatch_priority;
      if (level > 0) (*out.mutable_parameters())["priority"].set_uint64_param(level);
      if (all_timeouts && any_timeout)
        (*out.mutable_parameters())["timeout"].set_int64_param(
            std::max<int64_t>(1, static_cast<int64_t>((latest - now) * 1e6)));
      bool own;
      grpc::SerializationTraits<inference::ModelInferRequest>::Serialize(out, &b->request, &own);
    }
    b->start = now;
    for (auto* c : b->members) TRACE_AT(c, 1);
    CallUnary(&infer_stub_, &b->ctx, kInfer, &b->request, &b->response, [this, b](grpc::Status s) { Done(b, s); });
  }

  void Done(Batch* b, grpc::Status status) {
    const double end = Now();
#ifdef SMDP_TRACE
    for (auto* c : b->members) c->trace_[2] = end;
#endif
    std::vector<grpc::ByteBuffer> answers;
    if (status.ok() && b->members.size() > 1) {
      inference::ModelInferResponse merged;
      std::vector<inference::ModelInferResponse> parts;
      std::string error;
      grpc::ByteBuffer copy(b->response);
      if (!grpc::SerializationTraits<inference::ModelInferResponse>::Deserialize(&copy, &merged).ok()) {
        status = grpc::Status(grpc::StatusCode::INTERNAL, "smdp gate: Triton's merged answer does not parse");
      } else if (!SplitResponse(merged, b->requests, b->member_rows, &parts, &error)) {
        status = grpc::Status(grpc::StatusCode::INTERNAL, "smdp gate: " + error);
      } else {
        answers.resize(parts.size());
        for (size_t i = 0; i < parts.size(); ++i) {
          bool own;
          grpc::SerializationTraits<inference::ModelInferResponse>::Serialize(parts[i], &answers[i], &own);
        }
      }
    }
    ModelState* ms = b->model;
    if (ms != nullptr && status.error_code() == grpc::StatusCode::CANCELLED) {
      // Triton or the connection ended the call (Triton shutting down), or a lone caller went away
      // (its answer is moot then): retryable for the members, as the Python plane answers it.
      status = grpc::Status(grpc::StatusCode::UNAVAILABLE, "Triton ended the call: " + status.error_message());
    }
    bool lost = false;
    // NOT_FOUND for a version the requests name (one batch holds one version) is Triton's answer to
    // them, passed on as it is: the model itself is still there.
    if (ms != nullptr && status.error_code() == grpc::StatusCode::NOT_FOUND &&
        b->members.front()->req_.model_version().empty()) {
      // A model the gate was serving vanished (Triton restarting, or the model unloaded): retryable.
      // The control plane hears of it (`lost`) and re-reads the model's config when it is back.
      status = grpc::Status(grpc::StatusCode::UNAVAILABLE,
                            "model '" + ms->name + "' is not available on Triton: " + status.error_message());
      std::lock_guard<std::mutex> lock(ms->mu);
      lost = !ms->lost_reported;
      ms->lost_reported = true;
    }
    if (lost) Emit("lost " + ms->wire);
    // The report is written first: once answered, a member's memory may be freed at any moment. It is
    // queued before the answers go, so that a report (the control plane's barrier) after an answer has it.
    Step<Member*> step;
    if (ms != nullptr) {
      std::lock_guard<std::mutex> lock(ms->mu);
      // reported with the next periodic report
      ms->batches.push_back(BatchRecord{static_cast<int>(b->members.size()), b->rows, std::max(0.0, end - b->start),
                                        static_cast<int>(status.error_code()), b->reason});
      for (auto* c : b->members) ms->batch_waits.push_back(std::max(0.0, b->start - c->pending_.arrival));
      for (auto* c : b->members) c->batch_ = nullptr;
      if (ms->gate) {
        ms->gate->Complete();
        step = PollLocked(ms, end);
        if (ms->forgetting && ms->gate->in_flight() == 0 && ms->gate->queue_length() == 0) {
          ms->gate.reset();
          ms->forgetting = false;
        }
      }
    }
    // Answer the members before the next batch goes out: their latency should not include its send.
    // (StartWrite serializes at once: the buffers may go when this returns.)
    for (size_t i = 0; i < b->members.size(); ++i) {
      TRACE_AT(b->members[i], 3);
      if (!status.ok())
        b->members[i]->Reply(nullptr, status);
      else
        b->members[i]->Reply(b->members.size() == 1 ? &b->response : &answers[i], status);
    }

    if (ms != nullptr) Carry(ms, std::move(step));
    delete b;
  }

  grpc::GenericStub stub_;
  grpc::GenericStub infer_stub_;
  std::map<std::string, std::string> denied_;  // method path -> PERMISSION_DENIED message
  std::mutex seen_mu_;
  std::unordered_map<std::string, double> seen_at_;
  std::mutex models_mu_;
  std::unordered_map<std::string, std::unique_ptr<ModelState>> models_;
  std::mutex timer_mu_;
  std::condition_variable timer_cv_;
  std::multimap<double, ModelState*> wakeups_;
};

void InferCall::OnReadDone(bool ok) {
  TRACE_AT(this, 0);
  if (!ok) {
    Reply(nullptr, grpc::Status(grpc::StatusCode::CANCELLED, "no request message"));
    return;
  }
  grpc::ByteBuffer copy(in_);  // Deserialize consumes its buffer; `in_` stays for relaying as is
  if (!grpc::SerializationTraits<inference::ModelInferRequest>::Deserialize(&copy, &req_).ok()) {
    Reply(nullptr, grpc::Status(grpc::StatusCode::INTERNAL, kUnparsable));  // as Triton answers it
    return;
  }
  if (!svc_->Admit(this)) svc_->RelayAlone(this);
}

void InferCall::OnCancel() { svc_->Cancelled(this); }

// -- streams ------------------------------------------------------------------------------------

void StreamMember::Reply(const grpc::ByteBuffer* response, const grpc::Status& status) {
  if (answered_.exchange(true)) return;
  stream_->Deliver(this, response, status);
}
std::chrono::system_clock::time_point StreamMember::Deadline() const { return stream_->deadline(); }
void StreamMember::AddMetadataTo(grpc::ClientContext* to) const { stream_->AddMetadataTo(to); }

// A ModelInferResponse's bytes as a ModelStreamInferResponse's (field 2, infer_response), no parse.
grpc::ByteBuffer WrapInStreamResponse(const grpc::ByteBuffer& response) {
  std::vector<grpc::Slice> slices;
  (void)response.Dump(&slices);
  unsigned char head[11];
  size_t n = 0;
  head[n++] = 0x12;  // field 2, length-delimited
  for (uint64_t len = response.Length();; len >>= 7) {
    head[n++] = static_cast<unsigned char>((len & 0x7f) | (len >= 0x80 ? 0x80 : 0));
    if (len < 0x80) break;
  }
  std::vector<grpc::Slice> all;
  all.reserve(slices.size() + 1);
  all.emplace_back(head, n);
  for (auto& sl : slices) all.push_back(sl);
  return grpc::ByteBuffer(all.data(), all.size());
}

grpc::ByteBuffer StreamError(const inference::ModelInferRequest& req, const std::string& message) {
  inference::ModelStreamInferResponse r;
  r.set_error_message(message);
  auto* ir = r.mutable_infer_response();
  ir->set_model_name(req.model_name());
  ir->set_model_version(req.model_version());
  ir->set_id(req.id());
  grpc::ByteBuffer out;
  bool own;
  grpc::SerializationTraits<inference::ModelStreamInferResponse>::Serialize(r, &out, &own);
  return out;
}

StreamCall::StreamCall(Service* svc, grpc::GenericStub* stub, Incoming* in)
    : ServerBidi(in),
      svc_(svc),
      stub_(stub),
      metadata_(ForwardedMetadata(*context())),  // kept for members served after this reactor is done
      deadline_(context()->deadline()),
      up_(this) {
  StartRead(&in_);
}

void StreamCall::OnReadDone(bool ok) {
  auto* m = ok ? new StreamMember(this) : nullptr;
  if (m != nullptr) {
    m->in_ = in_;
    grpc::ByteBuffer copy(in_);  // Deserialize consumes its buffer
    if (!grpc::SerializationTraits<inference::ModelInferRequest>::Deserialize(&copy, &m->req_).ok()) {
      // As Triton: a message that does not parse ends the caller's requests (no answer for it or
      // anything after it; those before it are answered and the stream ends OK).
      delete m;
      m = nullptr;
    }
  }
  if (m == nullptr) {  // the caller half-closed (or went away): answer what is in flight, then finish
    {
      std::lock_guard<std::mutex> lock(mu_);
      reads_done_ = true;
    }
    UpPump();
    Pump();
    return;
  }
  {
    refs_.fetch_add(1);  // released when the member's answer is queued (Deliver)
    {
      std::lock_guard<std::mutex> lock(mu_);
      members_.insert(m);
    }
    if (!svc_->Admit(m)) {  // no gate for its model: relayed upstream (Admit may also answer at once)
      grpc::ByteBuffer msg(m->in_);
      {
        std::lock_guard<std::recursive_mutex> keep(members_mu_);
        std::lock_guard<std::mutex> lock(mu_);
        members_.erase(m);
        delete m;
      }
      refs_.fetch_sub(1);  // never the last: this reactor holds one
      SendUp(msg);
    }
  }
  // The next read, unless the stream finished meanwhile: a read must never start after Finish, so a
  // Finish decided while this read is being started is left to this thread (`finish_deferred_`).
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (finished_) return;
    read_starting_ = true;
  }
  StartRead(&in_);
  grpc::Status deferred;
  {
    std::lock_guard<std::mutex> lock(mu_);
    read_starting_ = false;
    if (!finish_deferred_) return;
    finish_deferred_ = false;
    deferred = finish_status_;
  }
  Finish(deferred);
}

void StreamCall::Deliver(StreamMember* m, const grpc::ByteBuffer* response, const grpc::Status& status) {
  grpc::ByteBuffer answer =
      status.ok() && response != nullptr ? WrapInStreamResponse(*response) : StreamError(m->req_, status.error_message());
  {
    std::lock_guard<std::recursive_mutex> keep(members_mu_);
    std::lock_guard<std::mutex> lock(mu_);
    members_.erase(m);
    if (!abandoned_ && !finished_) out_.push_back(std::move(answer));
    delete m;
  }
  Pump();
  Release();
}

void StreamCall::Write(grpc::ByteBuffer b) {
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (abandoned_ || finished_) return;
    out_.push_back(std::move(b));
  }
  Pump();
}

void StreamCall::OnWriteDone(bool ok) {
  {
    std::lock_guard<std::mutex> lock(mu_);
    write_busy_ = false;
  }
  if (!ok) Abandon(grpc::Status(grpc::StatusCode::CANCELLED, "the caller went away"));
  Pump();
}

void StreamCall::Pump() {
  grpc::ByteBuffer* next = nullptr;
  bool finish = false;
  grpc::Status status;
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (finished_ || write_busy_) return;
    if (!abandoned_ && !out_.empty()) {
      writing_ = std::move(out_.front());
      out_.pop_front();
      write_busy_ = true;
      next = &writing_;
    } else if (abandoned_ || (reads_done_ && members_.empty() && up_done_ && out_.empty())) {
      finished_ = true;
      status = abandoned_ ? end_ : grpc::Status::OK;
      if (read_starting_) {  // OnReadDone finishes once its StartRead returned
        finish_deferred_ = true;
        finish_status_ = status;
      } else {
        finish = true;
      }
    }
  }
  if (next != nullptr) StartWrite(next);
  else if (finish) Finish(status);
}

void StreamCall::SendUp(const grpc::ByteBuffer& b) {
  bool start = false;
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (abandoned_ || up_closed_) return;
    up_out_.push_back(b);
    if (!up_started_) {
      up_started_ = true;
      up_done_ = false;
      start = true;
    }
  }
  if (start) {  // only from OnReadDone, before the next read: no other thread touches `up_` yet
    refs_.fetch_add(1);  // released in UpDone
    AddMetadataTo(&up_.cctx);
    if (deadline_ != std::chrono::system_clock::time_point::max()) up_.cctx.set_deadline(deadline_);
#ifdef SMDP_CALLBACK_SERVER
    stub_->PrepareBidiStreamingCall(&up_.cctx, kStreamInfer, grpc::StubOptions(), &up_);
#else
    up_.Prepare(stub_, &up_.cctx, kStreamInfer);
#endif
    up_.AddHold();  // the write side, released when its writes are closed
    up_.StartRead(&up_.in);
    up_.StartCall();
    bool cancel = false;
    {
      std::lock_guard<std::mutex> lock(mu_);
      up_ready_ = true;
      if (abandoned_ && !up_closed_) {  // abandoned while starting: Abandon left the upstream to us
        up_closed_ = true;
        cancel = true;
      }
    }
    if (cancel) {
      up_.cctx.TryCancel();
      up_.RemoveHold();
      return;
    }
  }
  UpPump();
}

void StreamCall::UpPump() {
  grpc::ByteBuffer* next = nullptr;
  bool close = false;
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (!up_ready_ || up_busy_ || up_closed_) return;
    if (!up_out_.empty()) {
      up_writing_ = std::move(up_out_.front());
      up_out_.pop_front();
      up_busy_ = true;
      next = &up_writing_;
    } else if (reads_done_) {
      up_closed_ = true;
      close = true;
    }
  }
  if (next != nullptr) {
    up_.StartWrite(next);
  } else if (close) {  // every request relayed: Triton ends the stream once it has answered them
    up_.StartWritesDone();
    up_.RemoveHold();
  }
}

void StreamCall::UpWriteDone(bool ok) {
  bool close = false;
  {
    std::lock_guard<std::mutex> lock(mu_);
    up_busy_ = false;
    if (!ok && !up_closed_) {  // the upstream stream broke: OnDone reports how
      up_closed_ = true;
      up_out_.clear();
      close = true;
    }
  }
  if (close) up_.RemoveHold();
  else UpPump();
}

void StreamCall::UpDone(const grpc::Status& s) {
  bool failed;
  {
    std::lock_guard<std::mutex> lock(mu_);
    up_done_ = true;
    failed = !s.ok() && !abandoned_;
  }
  if (failed) Abandon(s);  // as the Python plane: the upstream stream's failure ends the caller's
  Pump();
  Release();
}

void StreamCall::Abandon(const grpc::Status& why) {
  std::lock_guard<std::recursive_mutex> keep(members_mu_);  // no member is freed under our feet
  std::vector<StreamMember*> members;
  bool cancel_up = false;
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (abandoned_) return;
    abandoned_ = true;
    end_ = why;
    out_.clear();
    members.assign(members_.begin(), members_.end());
    if (up_started_ && !up_done_) {
      up_.cctx.TryCancel();
      if (up_ready_ && !up_closed_) {
        up_closed_ = true;
        cancel_up = true;
      }
    }
  }
  if (cancel_up) up_.RemoveHold();
  // Withdraw what still waits in a gate (answered re-entrantly, and dropped); what is in flight
  // finishes for its batch and its answer is dropped.
  for (StreamMember* m : members) svc_->Cancelled(m);
  Pump();
}

// `key=value` fields of a command line.
std::map<std::string, std::string> Fields(std::istringstream& in) {
  std::map<std::string, std::string> out;
  std::string tok;
  while (in >> tok) {
    auto eq = tok.find('=');
    if (eq == std::string::npos) throw std::invalid_argument("expected key=value, got '" + tok + "'");
    out[tok.substr(0, eq)] = tok.substr(eq + 1);
  }
  return out;
}

int IntField(std::map<std::string, std::string>& f, const std::string& key, int dflt) {
  auto it = f.find(key);
  if (it == f.end()) return dflt;
  size_t used = 0;
  int v = std::stoi(it->second, &used);
  if (used != it->second.size()) throw std::invalid_argument(key + " must be an integer, got '" + it->second + "'");
  f.erase(it);
  return v;
}

// The fields of a `policy` command after its model name, parsed and checked; `what` names the command.
struct PolicyCommand {
  Policy policy;
  int slots = 1, max_queue = 1, default_priority = 0, priority_levels = 0, dispatch_priority = 0;
};

PolicyCommand ParsePolicyCommand(std::istringstream& in, int default_max_queue, const std::string& what) {
  auto f = Fields(in);
  PolicyCommand c;
  c.policy = ParsePolicy(&f);
  c.slots = IntField(f, "slots", 1);
  c.max_queue = IntField(f, "max_queue", default_max_queue);
  c.default_priority = IntField(f, "default_priority", 0);
  c.priority_levels = IntField(f, "priority_levels", 0);
  c.dispatch_priority = IntField(f, "dispatch_priority", 0);
  if (!f.empty()) throw std::invalid_argument(what + ": unknown key '" + f.begin()->first + "'");
  return c;
}

void ControlLoop(Service* svc, int default_max_queue) {
  std::string line;
  while (std::getline(std::cin, line)) {
    std::istringstream in(line);
    std::string op, model;
    in >> op;
    if (op.empty()) continue;
    if (op == "quit") break;
    if (op == "report") {
      svc->Report();
      Emit("reported");
      continue;
    }
    if (op == "check") {  // a policy's fields, parsed as `policy` parses them and installed nowhere
      try {
        ParsePolicyCommand(in, default_max_queue, "check");
        Emit("ok check");
      } catch (const std::exception& e) {
        Emit("error " + Quote(e.what()));
      }
      continue;
    }
    try {
      std::string quoted;
      if (!(in >> quoted)) throw std::invalid_argument(op + ": model name missing");
      if (!Unquote(quoted, &model) || !PlausibleModelName(model))
        throw std::invalid_argument(op + ": '" + quoted + "' is not a model name");
      if (op == "forget") {
        svc->Forget(model);
        Emit("ok forget " + quoted);
        continue;
      }
      if (op != "policy") throw std::invalid_argument("unknown command '" + op + "'");
      PolicyCommand c = ParsePolicyCommand(in, default_max_queue, "policy " + quoted);
      svc->SetPolicy(model, c.policy, c.slots, c.max_queue, c.default_priority, c.priority_levels, c.dispatch_priority);
      Emit("ok policy " + quoted);
    } catch (const std::exception& e) {
      Emit("error " + Quote(e.what()));
    }
  }
}

#ifndef SMDP_CALLBACK_SERVER
const char kHealthCheck[] = "/grpc.health.v1.Health/Check";
const char kHealthWatch[] = "/grpc.health.v1.Health/Watch";
const char kReflection[] = "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo";
const char kTritonService[] = "inference.GRPCInferenceService";
// What reflection lists: Triton's service (every method reaches the gate, and Triton through it),
// health and reflection, each resolvable from the descriptors linked in.
const char* const kServices[] = {kTritonService, "grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection"};

template <class Message>
bool ParseBuffer(const grpc::ByteBuffer& in, Message* out) {
  grpc::ByteBuffer copy(in);  // Deserialize consumes its buffer
  return grpc::SerializationTraits<Message>::Deserialize(&copy, out).ok();
}
template <class Message>
void SerializeTo(const Message& m, grpc::ByteBuffer* out) {
  bool own;
  grpc::SerializationTraits<Message>::Serialize(m, out, &own);
}

class HealthCall;

// gRPC's health service as gRPC's default one answers it: SERVING for the server ("") and Triton's
// service until shutdown, NOT_SERVING from then on; another name is NOT_FOUND on Check and
// SERVICE_UNKNOWN on Watch. Watchers hear every change.
class Health {
 public:
  using Serving = grpc::health::v1::HealthCheckResponse::ServingStatus;
  Serving Of(const std::string& service) const {
    if (!service.empty() && service != kTritonService) return grpc::health::v1::HealthCheckResponse::SERVICE_UNKNOWN;
    return serving_.load() ? grpc::health::v1::HealthCheckResponse::SERVING
                           : grpc::health::v1::HealthCheckResponse::NOT_SERVING;
  }
  void Watch(HealthCall* w);
  void Unwatch(HealthCall* w) {
    std::lock_guard<std::mutex> lock(mu_);
    watchers_.erase(w);
  }
  void Shutdown();

 private:
  std::atomic<bool> serving_{true};
  std::mutex mu_;
  std::set<HealthCall*> watchers_;
};

class HealthCall : public ServerBidi {
 public:
  HealthCall(Health* health, Incoming* in, bool watch) : ServerBidi(in), health_(health), watch_(watch) {
    StartRead(&in_);
  }
  const std::string& service() const { return service_; }

  void OnReadDone(bool ok) override {
    grpc::health::v1::HealthCheckRequest req;
    if (!ok) {
      Finish(grpc::Status(grpc::StatusCode::CANCELLED, "no request message"));
    } else if (!ParseBuffer(in_, &req)) {
      Finish(grpc::Status(grpc::StatusCode::INVALID_ARGUMENT, "could not parse request"));
    } else if (watch_) {
      service_ = req.service();
      watching_ = true;
      health_->Watch(this);  // sends the status now and at every change
    } else {
      Health::Serving s = health_->Of(req.service());
      if (s == grpc::health::v1::HealthCheckResponse::SERVICE_UNKNOWN) {
        Finish(grpc::Status(grpc::StatusCode::NOT_FOUND, "service name unknown"));
        return;
      }
      grpc::health::v1::HealthCheckResponse r;
      r.set_status(s);
      SerializeTo(r, &out_);
      StartWriteAndFinish(&out_, grpc::WriteOptions(), grpc::Status::OK);
    }
  }

  // Watch: the latest status goes out once the write before it is done.
  void Send(Health::Serving s) {
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (ended_) return;
      next_ = s;
      have_next_ = true;
    }
    Pump();
  }
  void OnWriteDone(bool ok) override {
    {
      std::lock_guard<std::mutex> lock(mu_);
      busy_ = false;
      if (!ok) ended_ = true;
    }
    Pump();
  }
  void OnCancel() override {
    {
      std::lock_guard<std::mutex> lock(mu_);
      ended_ = true;
    }
    Pump();
  }
  void OnDone() override {
    if (watching_) health_->Unwatch(this);
    delete this;
  }

 private:
  // The next write or the Finish, started outside the lock (once finished, this may go at any moment).
  void Pump() {
    bool write = false, finish = false;
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (busy_ || finished_) return;
      if (ended_) {
        finished_ = finish = true;
      } else if (have_next_) {
        grpc::health::v1::HealthCheckResponse r;
        r.set_status(next_);
        have_next_ = false;
        SerializeTo(r, &out_);
        busy_ = write = true;
      }
    }
    if (write) StartWrite(&out_);
    else if (finish) Finish(grpc::Status(grpc::StatusCode::CANCELLED, ""));
  }

  Health* health_;
  bool watch_, watching_ = false;
  std::string service_;
  grpc::ByteBuffer in_, out_;
  std::mutex mu_;
  Health::Serving next_ = grpc::health::v1::HealthCheckResponse::UNKNOWN;
  bool have_next_ = false, busy_ = false, ended_ = false, finished_ = false;
};

void Health::Watch(HealthCall* w) {
  std::lock_guard<std::mutex> lock(mu_);
  watchers_.insert(w);
  w->Send(Of(w->service()));
}

void Health::Shutdown() {
  serving_ = false;
  std::lock_guard<std::mutex> lock(mu_);
  for (HealthCall* w : watchers_) w->Send(Of(w->service()));
}

// gRPC server reflection (v1alpha, what grpcurl and grpc_reflection clients ask), answered from the
// descriptors linked into this binary, as gRPC's own reflection service answers: each file with the
// dependencies not yet sent on the stream.
class ReflectionCall : public ServerBidi {
 public:
  explicit ReflectionCall(Incoming* in) : ServerBidi(in) { StartRead(&in_); }

  void OnReadDone(bool ok) override {
    using namespace grpc::reflection::v1alpha;
    ServerReflectionRequest req;
    if (!ok) {  // the caller is done asking
      Finish(grpc::Status::OK);
      return;
    }
    if (!ParseBuffer(in_, &req)) {
      Finish(grpc::Status(grpc::StatusCode::INVALID_ARGUMENT, "could not parse request"));
      return;
    }
    ServerReflectionResponse r;
    r.set_valid_host(req.host());
    *r.mutable_original_request() = req;
    const auto* pool = google::protobuf::DescriptorPool::generated_pool();
    auto error = [&r](grpc::StatusCode code, const char* message) {
      r.mutable_error_response()->set_error_code(code);
      r.mutable_error_response()->set_error_message(message);
    };
    switch (req.message_request_case()) {
      case ServerReflectionRequest::kListServices:
        for (const char* name : kServices) r.mutable_list_services_response()->add_service()->set_name(name);
        break;
      case ServerReflectionRequest::kFileByFilename: {
        const auto* f = pool->FindFileByName(req.file_by_filename());
        if (f == nullptr) error(grpc::StatusCode::NOT_FOUND, "File not found.");
        else AddFile(f, &r);
        break;
      }
      case ServerReflectionRequest::kFileContainingSymbol: {
        const auto* f = pool->FindFileContainingSymbol(req.file_containing_symbol());
        if (f == nullptr) error(grpc::StatusCode::NOT_FOUND, "Symbol not found.");
        else AddFile(f, &r);
        break;
      }
      case ServerReflectionRequest::kFileContainingExtension: {
        const auto* type = pool->FindMessageTypeByName(req.file_containing_extension().containing_type());
        const auto* ext = type == nullptr ? nullptr
                                          : pool->FindExtensionByNumber(
                                                type, req.file_containing_extension().extension_number());
        if (type == nullptr) error(grpc::StatusCode::NOT_FOUND, "Type not found.");
        else if (ext == nullptr) error(grpc::StatusCode::NOT_FOUND, "Extension not found.");
        else AddFile(ext->file(), &r);
        break;
      }
      case ServerReflectionRequest::kAllExtensionNumbersOfType: {
        const auto* type = pool->FindMessageTypeByName(req.all_extension_numbers_of_type());
        if (type == nullptr) {
          error(grpc::StatusCode::NOT_FOUND, "Type not found.");
          break;
        }
        std::vector<const google::protobuf::FieldDescriptor*> exts;
        pool->FindAllExtensions(type, &exts);
        auto* out = r.mutable_all_extension_numbers_response();
        out->set_base_type_name(type->full_name());
        for (const auto* e : exts) out->add_extension_number(e->number());
        break;
      }
      default:
        error(grpc::StatusCode::UNIMPLEMENTED, "");
    }
    SerializeTo(r, &out_);
    StartWrite(&out_);
  }
  void OnWriteDone(bool ok) override {
    if (ok) StartRead(&in_);
    else Finish(grpc::Status(grpc::StatusCode::CANCELLED, "the caller went away"));
  }
  void OnDone() override { delete this; }

 private:
  void AddFile(const google::protobuf::FileDescriptor* f, grpc::reflection::v1alpha::ServerReflectionResponse* r) {
    if (!sent_.insert(f->name()).second) return;
    google::protobuf::FileDescriptorProto proto;
    f->CopyTo(&proto);
    proto.SerializeToString(r->mutable_file_descriptor_response()->add_file_descriptor_proto());
    for (int i = 0; i < f->dependency_count(); ++i) AddFile(f->dependency(i), r);
  }

  grpc::ByteBuffer in_, out_;
  std::set<std::string> sent_;  // files sent on this stream
};

// Takes the server's calls off the completion queue and gives each its handler. Several calls are
// asked for at once, so that a burst of arrivals does not wait for one another to be handed over.
class Acceptor {
 public:
  Acceptor(grpc::AsyncGenericService* generic, grpc::ServerCompletionQueue* cq, Service* svc, Health* health)
      : generic_(generic), cq_(cq), svc_(svc), health_(health) {}
  void Start(int outstanding) {
    for (int i = 0; i < outstanding; ++i) Next();
  }

 private:
  void Next() {
    auto* in = new Incoming();
    generic_->RequestCall(&in->ctx, &in->stream, cq_, cq_, Tagged([this, in](bool ok) {
      if (!ok) {  // the server is shutting down
        delete in;
        return;
      }
      Next();
      const std::string& m = in->ctx.method();
      if (m == kHealthCheck || m == kHealthWatch) new HealthCall(health_, in, m == kHealthWatch);
      else if (m == kReflection) new ReflectionCall(in);
      else svc_->Create(in, m);
    }));
  }

  grpc::AsyncGenericService* generic_;
  grpc::ServerCompletionQueue* cq_;
  Service* svc_;
  Health* health_;
};
#else
// Reflection lists the services registered by type, and the generic service that carries Triton's
// protocol is not one. This registers one method of a name no client calls under Triton's service, so
// that reflection lists "inference.GRPCInferenceService" (its descriptors are linked in); every real
// method still reaches the generic service, which takes whatever no typed service registered.
class ReflectionListing : public grpc::Service {
 public:
  ReflectionListing() {
    AddMethod(new grpc::internal::RpcServiceMethod("/inference.GRPCInferenceService/SmdpGateReflectionListing",
                                                   grpc::internal::RpcMethod::NORMAL_RPC, nullptr));
    MarkMethodRawCallback(0, new grpc::internal::CallbackUnaryHandler<grpc::ByteBuffer, grpc::ByteBuffer>(
                                 [](grpc::CallbackServerContext* ctx, const grpc::ByteBuffer*, grpc::ByteBuffer*) {
                                   auto* reactor = ctx->DefaultReactor();
                                   reactor->Finish(grpc::Status(grpc::StatusCode::UNIMPLEMENTED, ""));
                                   return reactor;
                                 }));
  }
};
#endif

int Main(int argc, char** argv) {
  std::string listen = "127.0.0.1:0", upstream;
  int max_queue = 1024;
  double report_s = 0.05;
  std::vector<std::string> deny;  // methods answered PERMISSION_DENIED (repository control by default)
  for (int i = 1; i < argc; ++i) {
    std::string a = argv[i];
    auto value = [&](const char* name) -> std::string {
      if (i + 1 >= argc) throw std::invalid_argument(std::string(name) + " needs a value");
      return argv[++i];
    };
    if (a == "--listen") listen = value("--listen");
    else if (a == "--upstream") upstream = value("--upstream");
    else if (a == "--max-queue") max_queue = std::stoi(value("--max-queue"));
    else if (a == "--report-interval-ms") report_s = std::stod(value("--report-interval-ms")) / 1000.0;
    else if (a == "--deny") deny.push_back(value("--deny"));
    else if (a == "--upstream-timeout-ms") g_upstream_timeout_s = std::stod(value("--upstream-timeout-ms")) / 1000.0;
    else throw std::invalid_argument("unknown flag " + a +
                                     " (flags: --listen --upstream --max-queue --report-interval-ms --upstream-timeout-ms --deny METHOD)");
  }
  if (upstream.empty()) throw std::invalid_argument("--upstream HOST:PORT (Triton's gRPC endpoint) is required");
  if (max_queue < 1) throw std::invalid_argument("--max-queue must be >= 1");

  // Signals go to one thread, which stops the server; everything else runs with them blocked.
  sigset_t sigs;
  sigemptyset(&sigs);
  sigaddset(&sigs, SIGTERM);
  sigaddset(&sigs, SIGINT);
  pthread_sigmask(SIG_BLOCK, &sigs, nullptr);

  google::protobuf::SetLogHandler(&ProtobufLog);
  // gRPC's locks are absl::Mutex; a distribution's absl built without NDEBUG (Debian's) checks every
  // acquisition for lock-order cycles (a graph update per Lock, ~2% of the gate's CPU samples under
  // load). That is a debugging aid for gRPC's own developers: off, as an NDEBUG build has it.
  absl::SetMutexDeadlockDetectionMode(absl::OnDeadlockCycle::kIgnore);
  grpc::ChannelArguments args;
  args.SetMaxReceiveMessageSize(-1);
  args.SetMaxSendMessageSize(-1);
  // Reconnect quickly after Triton restarts (as the Python plane): recovery well under a second.
  args.SetInt(GRPC_ARG_INITIAL_RECONNECT_BACKOFF_MS, 100);
  args.SetInt(GRPC_ARG_MIN_RECONNECT_BACKOFF_MS, 100);
  args.SetInt(GRPC_ARG_MAX_RECONNECT_BACKOFF_MS, 1000);
  // Triton's errors quote what the client sent (a model name, an input's name): an answer larger than
  // gRPC's default metadata limit must come back as that request's answer, not fail the connection
  // (and every batch in flight on it).
  args.SetInt(GRPC_ARG_MAX_METADATA_SIZE, INT_MAX);
  args.SetInt("grpc.absolute_max_metadata_size", INT_MAX);
  auto channel = grpc::CreateCustomChannel(upstream, grpc::InsecureChannelCredentials(), args);
  Service svc(channel, deny);
  std::thread writer([] { g_out.Run(); });
  std::once_flag output_done;
  auto finish_output = [&] {  // write everything queued, then stop the writer (once, from either path)
    std::call_once(output_done, [&] {
      g_out.Close();
      writer.join();
    });
  };
  grpc::ServerBuilder builder;
  int port = 0;
  builder.AddListeningPort(listen, grpc::InsecureServerCredentials(), &port);
  builder.SetMaxReceiveMessageSize(-1);
  builder.SetMaxSendMessageSize(-1);
#ifdef SMDP_CALLBACK_SERVER
  grpc::EnableDefaultHealthCheckService(true);
  // gRPC reflection as the Python plane serves it: Triton's service, health and reflection itself.
  grpc::reflection::InitProtoReflectionServerBuilderPlugin();
  ReflectionListing listing;
  builder.RegisterService(&listing);
  builder.RegisterCallbackGenericService(&svc);
#else
  // Health and reflection are answered on the same queue (HealthCall, ReflectionCall): no service of
  // gRPC's own, whose threads would poll too.
  Health health;
  grpc::AsyncGenericService generic;
  builder.RegisterAsyncGenericService(&generic);
  std::unique_ptr<grpc::ServerCompletionQueue> cq = builder.AddCompletionQueue();
  g_cq = cq.get();
#endif
  std::unique_ptr<grpc::Server> server = builder.BuildAndStart();
  if (!server || port == 0) {
    finish_output();
    throw std::runtime_error("cannot listen on " + listen);
  }
#ifdef SMDP_CALLBACK_SERVER
  // Health as the Python plane serves it: overall, and for the inference service by name.
  server->GetHealthCheckService()->SetServingStatus("inference.GRPCInferenceService", true);
  auto stop_health = [&] { server->GetHealthCheckService()->Shutdown(); };
#else
  Acceptor acceptor(&generic, cq.get(), &svc, &health);
  acceptor.Start(16);
  std::thread(Drain, cq.get()).detach();  // lives until the process exits (never shut down: below)
  auto stop_health = [&] { health.Shutdown(); };
#endif
  Emit("listening " + std::to_string(port));

  std::atomic<bool> stop{false};
  std::thread timer([&] { svc.TimerLoop(report_s, &stop); });
  std::thread signals([&] {  // SIGTERM: finish what is in flight (5 s at most), report, exit
    int sig = 0;
    sigwait(&sigs, &sig);
    stop_health();  // NOT_SERVING from now: load balancers move away
    server->Shutdown(std::chrono::system_clock::now() + std::chrono::seconds(5));
    svc.Report();
    finish_output();
#ifdef SMDP_TRACE
    TraceDump();
#endif
    std::_Exit(0);
  });
  signals.detach();
  ControlLoop(&svc, max_queue);  // until quit or end of input
  stop_health();
  // Shutdown returns once every call is over (in flight ones answered, or cancelled after 5 s).
  server->Shutdown(std::chrono::system_clock::now() + std::chrono::seconds(5));
  server->Wait();
  stop = true;
  svc.StopTimer();
  timer.join();  // its last report is queued
  finish_output();
#ifdef SMDP_TRACE
  TraceDump();
#endif
#ifndef SMDP_CALLBACK_SERVER
  // The queue is never shut down: a batch still in flight to Triton (its callers gone) may complete
  // and start another call at any time, which a shut-down queue would refuse with an abort.
  std::_Exit(0);
#endif
  return 0;
}

}  // namespace
}  // namespace smdp

int main(int argc, char** argv) {
  try {
    return smdp::Main(argc, argv);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "smdp-gate: %s\n", e.what());
    return 2;
  }
}
