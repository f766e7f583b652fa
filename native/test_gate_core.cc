// Unit tests of the native gate's decision core and of merging/splitting, with no network and a
// hand-driven clock. Each case mirrors a case of tests/test_gate.py or tests/test_merge.py, so the
// C++ and Python planes decide alike. Run: make -C native test (pytest runs it too).
#include <cmath>
#include <cstdio>
#include <cstring>
#include <functional>
#include <string>
#include <vector>

#include "gate_core.h"
#include "merge.h"

namespace {

int g_failed = 0, g_checks = 0;
#define CHECK(cond)                                                                   \
  do {                                                                                \
    ++g_checks;                                                                       \
    if (!(cond)) {                                                                    \
      ++g_failed;                                                                     \
      std::fprintf(stderr, "%s:%d: CHECK failed: %s\n", __FILE__, __LINE__, #cond);  \
    }                                                                                 \
  } while (0)

template <typename E>
bool Throws(const std::function<void()>& f, const char* needle) {
  try {
    f();
  } catch (const E& e) {
    return std::strstr(e.what(), needle) != nullptr;
  }
  return false;
}

using smdp::ModelGate;
using smdp::Pending;
using smdp::Policy;
using P = Pending<int>;

Policy Table(std::vector<int> t, int b, int beyond = -1, double max_wait = -1) {
  Policy p;
  p.table = std::move(t);
  p.max_batch = b;
  p.beyond = beyond < 0 ? b : beyond;
  p.max_wait_s = max_wait;
  return p;
}

P Req(int id, double t, std::string key = "k", int rows = 1, int prio = 0, double deadline = INFINITY) {
  P p;
  p.payload = id;
  p.arrival = t;
  p.key = std::move(key);
  p.rows = rows;
  p.priority = prio;
  p.deadline = deadline;
  return p;
}

std::vector<int> Ids(const std::vector<P*>& b) {
  std::vector<int> out;
  for (auto* p : b) out.push_back(p->payload);
  return out;
}

void TestPolicyDecide() {
  double re;
  Policy t = Table({0, 0, 2, 3}, 4);  // wait below 2, serve n; beyond the table min(n, B)
  CHECK(t.Decide(1, 0.0, &re) == 0 && re < 0);
  CHECK(t.Decide(2, 0.0, &re) == 2);
  CHECK(t.Decide(9, 0.0, &re) == 4);
  Policy st = Table({0, 0, 2}, 4, 2);  // static b0 = 2 stays static beyond its table
  CHECK(st.Decide(9, 0.0, &re) == 2);
  Policy g = Table({0, 0, 0, 0, 4}, 4, 4, 0.010);  // timeout:0.01 (Triton's rule)
  CHECK(g.Decide(2, 0.004, &re) == 0 && std::fabs(re - 0.006) < 1e-12);
  CHECK(g.Decide(2, 0.010, &re) == 2);
  CHECK(g.Decide(4, 0.0, &re) == 4);
  CHECK(g.Decide(0, 1.0, &re) == 0);
  CHECK(Throws<std::invalid_argument>([] { Table({0, 2}, 4).Validate(); }, "a(1) = 2"));
  CHECK(Throws<std::invalid_argument>([] { Table({0, 1}, 4, 5).Validate(); }, "beyond"));
  CHECK(Throws<std::invalid_argument>([] { Table({}, 4).Validate(); }, "empty"));
}

void TestGateServesByTable() {
  ModelGate<int> gate(Table({0, 0, 0, 3}, 4), 1, 8);
  P a = Req(1, 0.0), b = Req(2, 0.1), c = Req(3, 0.2), d = Req(4, 0.3);
  CHECK(gate.Submit(&a));
  CHECK(gate.Poll(0.0).batches.empty());
  CHECK(gate.Submit(&b));
  CHECK(gate.Poll(0.1).batches.empty());
  CHECK(gate.Submit(&c));
  auto s = gate.Poll(0.2);
  CHECK(s.batches.size() == 1 && Ids(s.batches[0]) == std::vector<int>({1, 2, 3}));
  CHECK(gate.in_flight() == 1 && gate.queue_length() == 0);
  CHECK(gate.Submit(&d));
  CHECK(gate.Poll(0.3).batches.empty());  // no free slot
  gate.Complete();
  CHECK(gate.Poll(0.4).batches.empty());  // n = 1: the table waits
  CHECK(gate.counters().dispatched_batches == 1 && gate.counters().dispatched_requests == 3);
  CHECK(Throws<std::logic_error>([&] { gate.Complete(); }, "without a batch"));
}

void TestQueueBound() {
  ModelGate<int> gate(Table({0, 0}, 4), 1, 2);
  P a = Req(1, 0), b = Req(2, 0), c = Req(3, 0);
  CHECK(gate.Submit(&a) && gate.Submit(&b));
  CHECK(!gate.Submit(&c));
  CHECK(gate.queue_length() == 2 && gate.counters().rejected == 1);
}

void TestPriorityAndKeys() {
  ModelGate<int> gate(Table({0, 1}, 4), 1, 16);
  P low1 = Req(1, 0.0, "k", 1, 2), other = Req(2, 0.1, "x", 1, 2), high = Req(3, 0.2, "k", 1, 1),
    low2 = Req(4, 0.3, "k", 1, 2);
  for (P* p : {&low1, &other, &high, &low2}) CHECK(gate.Submit(p));
  auto s = gate.Poll(0.4);  // n = 4 -> serve 4; head is the urgent one; "x" cannot join
  CHECK(s.batches.size() == 1 && Ids(s.batches[0]) == std::vector<int>({3, 1, 4}));
  CHECK(gate.queue_length() == 1);
  gate.Complete();
  s = gate.Poll(0.5);
  CHECK(s.batches.size() == 1 && Ids(s.batches[0]) == std::vector<int>({2}));
}

void TestRowsCapAndLoneRequests() {
  ModelGate<int> gate(Table({0, 1}, 4), 2, 16);
  P a = Req(1, 0, "k", 3), b = Req(2, 0, "k", 2), c = Req(3, 0, "k", 1), lone = Req(4, 0, "", 1), d = Req(5, 0, "k", 1);
  for (P* p : {&a, &b, &c, &lone, &d}) CHECK(gate.Submit(p));
  auto s = gate.Poll(0);
  // rows: a(3) + c(1) = 4 = B (b would exceed it); then b alone... the next slot takes b + d
  CHECK(s.batches.size() == 2);
  CHECK(Ids(s.batches[0]) == std::vector<int>({1, 3}));
  CHECK(Ids(s.batches[1]) == std::vector<int>({2, 5}));
  gate.Complete();
  s = gate.Poll(0);
  CHECK(s.batches.size() == 1 && Ids(s.batches[0]) == std::vector<int>({4}));  // empty key: alone
}

void TestCancelExpireAndWake() {
  ModelGate<int> gate(Table({0, 0, 0, 3}, 4, 4, 0.050), 1, 16);
  P a = Req(1, 0.0, "k", 1, 0, 0.020), b = Req(2, 0.01), c = Req(3, 0.015);
  for (P* p : {&a, &b, &c}) CHECK(gate.Submit(p));
  CHECK(gate.Cancel(&c) && !gate.Cancel(&c));
  auto s = gate.Poll(0.012);
  CHECK(s.batches.empty() && std::fabs(s.wake_at - 0.020) < 1e-12);  // a's deadline before the guard
  s = gate.Poll(0.020);
  CHECK(s.expired.size() == 1 && s.expired[0]->payload == 1);
  CHECK(std::fabs(s.wake_at - 0.060) < 1e-12);  // guard: b has waited 10 ms of 50
  s = gate.Poll(0.0601);
  CHECK(s.batches.size() == 1 && Ids(s.batches[0]) == std::vector<int>({2}));
  CHECK(gate.counters().expired == 1 && gate.counters().cancelled == 1);
}

void TestSlotsAndPolicySwap() {
  ModelGate<int> gate(Table({0, 0, 0}, 4), 1, 16);
  P a = Req(1, 0), b = Req(2, 0);
  CHECK(gate.Submit(&a) && gate.Submit(&b));
  CHECK(gate.Poll(0).batches.empty());
  gate.SetPolicy(Table({0, 1}, 4));
  CHECK(gate.Poll(0).batches.size() == 1);
  gate.SetSlots(2);
  CHECK(gate.slots() == 2 && gate.in_flight() == 1);
  CHECK(Throws<std::invalid_argument>([&] { gate.SetPolicy(Table({1}, 4)); }, "a(0)"));
}

inference::ModelInferRequest Infer(const std::string& id, int rows, float base, const char* dt = "FP32") {
  inference::ModelInferRequest r;
  r.set_model_name("m");
  r.set_id(id);
  auto* in = r.add_inputs();
  in->set_name("INPUT0");
  in->set_datatype(dt);
  in->add_shape(rows);
  in->add_shape(2);
  std::string raw;
  for (int i = 0; i < rows * 2; ++i) {
    float v = base + i;
    raw.append(reinterpret_cast<const char*>(&v), 4);
  }
  r.add_raw_input_contents(raw);
  r.add_outputs()->set_name("OUTPUT0");
  return r;
}

void TestMergeKey() {
  int rows = 0;
  auto a = Infer("a", 1, 0), b = Infer("b", 3, 10);
  CHECK(!smdp::MergeKey(a, &rows).empty() && rows == 1);
  const std::string ka = smdp::MergeKey(a, &rows);
  CHECK(ka == smdp::MergeKey(b, &rows) && rows == 3);
  (*b.mutable_parameters())["priority"].set_uint64_param(1);  // per caller: still mergeable
  (*b.mutable_parameters())["timeout"].set_int64_param(1000);
  CHECK(smdp::MergeKey(a, &rows) == smdp::MergeKey(b, &rows));
  auto c = Infer("c", 1, 0);
  c.mutable_inputs(0)->set_shape(1, 3);  // other dims: another class (and a size mismatch)
  CHECK(smdp::MergeKey(c, &rows).empty());
  auto d = Infer("d", 1, 0);
  (*d.mutable_parameters())["sequence_id"].set_int64_param(7);
  CHECK(smdp::MergeKey(d, &rows).empty());
  auto e = Infer("e", 1, 0);
  e.mutable_inputs(0)->mutable_contents()->add_fp32_contents(1.0f);
  CHECK(smdp::MergeKey(e, &rows).empty());
  auto f = Infer("f", 1, 0);
  f.set_model_version("2");
  CHECK(smdp::MergeKey(f, &rows) != smdp::MergeKey(a, &rows));
  auto g = Infer("g", 1, 0);
  (*g.mutable_outputs(0)->mutable_parameters())["classification"].set_int64_param(2);
  CHECK(smdp::MergeKey(g, &rows) != smdp::MergeKey(a, &rows));
}

void TestMergeAndSplit() {
  auto a = Infer("a", 1, 0), b = Infer("b", 2, 100);
  std::vector<const inference::ModelInferRequest*> members{&a, &b};
  std::vector<int> rows{1, 2};
  auto m = smdp::MergeRequests(members, rows);
  CHECK(m.inputs(0).shape(0) == 3 && m.inputs(0).shape(1) == 2);
  CHECK(m.raw_input_contents(0) == a.raw_input_contents(0) + b.raw_input_contents(0));
  CHECK(m.id().empty() && m.parameters().count("priority") == 0);

  inference::ModelInferResponse resp;  // an echo model: output = input; plus a BYTES output
  resp.set_model_name("m");
  resp.set_model_version("1");
  auto* o = resp.add_outputs();
  o->set_name("OUTPUT0");
  o->set_datatype("FP32");
  o->add_shape(3);
  o->add_shape(2);
  resp.add_raw_output_contents(m.raw_input_contents(0));
  auto* s = resp.add_outputs();
  s->set_name("LABEL");
  s->set_datatype("BYTES");
  s->add_shape(3);
  s->add_shape(1);
  std::string labels;
  for (std::string w : {"x", "yy", "zzz"}) {
    uint32_t n = static_cast<uint32_t>(w.size());
    labels.append(reinterpret_cast<const char*>(&n), 4);
    labels += w;
  }
  resp.add_raw_output_contents(labels);
  std::vector<inference::ModelInferResponse> parts;
  std::string err;
  CHECK(smdp::SplitResponse(resp, members, rows, &parts, &err));
  CHECK(parts.size() == 2 && parts[0].id() == "a" && parts[1].id() == "b");
  CHECK(parts[0].raw_output_contents(0) == a.raw_input_contents(0));
  CHECK(parts[1].raw_output_contents(0) == b.raw_input_contents(0));
  CHECK(parts[1].outputs(0).shape(0) == 2 && parts[1].outputs(1).shape(0) == 2);
  CHECK(parts[0].raw_output_contents(1).size() == 5 && parts[1].raw_output_contents(1).size() == 13);

  resp.mutable_outputs(0)->set_shape(0, 4);  // rows do not add up: refused, not guessed
  CHECK(!smdp::SplitResponse(resp, members, rows, &parts, &err) && err.find("4 rows") != std::string::npos);
}

}  // namespace

int main() {
  TestPolicyDecide();
  TestGateServesByTable();
  TestQueueBound();
  TestPriorityAndKeys();
  TestRowsCapAndLoneRequests();
  TestCancelExpireAndWake();
  TestSlotsAndPolicySwap();
  TestMergeKey();
  TestMergeAndSplit();
  std::printf("%d checks, %d failed\n", g_checks, g_failed);
  return g_failed == 0 ? 0 : 1;
}
