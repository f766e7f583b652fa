// Unit tests of the native gate's decision core and of merging/splitting, with no network and a
// hand-driven clock. The decision core runs the shared vectors (tests/vectors/*.json, format in its
// README.md), which tests/test_vectors.py runs against the Python plane: both planes give one set of
// answers. Run: make -C native test (pytest runs it too). Usage: test_gate_core [VECTORS_DIR]
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <map>
#include <memory>
#include <sstream>
#include <string>
#include <vector>

#include "gate_core.h"
#include "json_lite.h"
#include "merge.h"

#ifndef SMDP_VECTORS_DIR
#define SMDP_VECTORS_DIR "../tests/vectors"
#endif

namespace {

int g_failed = 0, g_checks = 0;
std::string g_where;  // the vector being run, for failure messages
#define CHECK(cond)                                                                          \
  do {                                                                                       \
    ++g_checks;                                                                              \
    if (!(cond)) {                                                                           \
      ++g_failed;                                                                            \
      std::fprintf(stderr, "%s:%d: CHECK failed: %s%s%s\n", __FILE__, __LINE__, #cond,        \
                   g_where.empty() ? "" : "\n  in ", g_where.c_str());                       \
    }                                                                                        \
  } while (0)

using json_lite::Value;
using smdp::ModelGate;
using smdp::Pending;
using smdp::Policy;
using P = Pending<std::string>;

// -- the rule's text and decisions ----------------------------------------------------------------

void RunLines(const Value& cases) {
  for (const Value& c : cases.items()) {
    const std::string& line = c.at("line").str();
    g_where = "line: " + line;
    try {
      CHECK(smdp::FormatPolicy(smdp::ParsePolicyLine(line)) == line);
    } catch (const std::exception& e) {
      std::fprintf(stderr, "  %s\n", e.what());
      CHECK(!"the line parses");
    }
  }
}

void RunErrors(const Value& cases) {
  for (const Value& c : cases.items()) {
    const std::string& line = c.at("line").str();
    const std::string& want = c.at("error").str();
    g_where = "bad line: " + line + " (expected: " + want + ")";
    std::string got;
    try {
      smdp::ParsePolicyLine(line);
    } catch (const std::invalid_argument& e) {
      got = e.what();
    }
    CHECK(!got.empty() && got.find(want) != std::string::npos);
  }
}

void RunDecisions(const Value& groups) {
  for (const Value& g : groups.items()) {
    Policy p = smdp::ParsePolicyLine(g.at("rule").str());
    for (const Value& c : g.at("cases").items()) {
      int n = c.at("n").integer();
      double wait = c.at("wait").num();
      int busy = c.has("busy") ? c.at("busy").integer() : 0;
      g_where = "rule " + g.at("rule").str() + ": n=" + std::to_string(n) + " wait=" + std::to_string(wait) +
                " busy=" + std::to_string(busy);
      double recheck = 0;
      const char* reason = nullptr;
      int serve = p.Decide(n, wait, &recheck, &reason, busy);
      CHECK(serve == c.at("serve").integer());
      CHECK(std::string(reason) == c.at("reason").str());
      if (c.at("recheck").is_null()) CHECK(recheck < 0);
      else CHECK(std::fabs(recheck - c.at("recheck").num()) < 1e-9);
    }
  }
}

// -- the gate's scripts ---------------------------------------------------------------------------

std::vector<std::string> Ids(const std::vector<P*>& items) {
  std::vector<std::string> out;
  for (auto* p : items) out.push_back(p->payload);
  return out;
}

std::vector<std::string> Strings(const Value* v) {
  std::vector<std::string> out;
  if (v != nullptr)
    for (const Value& s : v->items()) out.push_back(s.str());
  return out;
}

int IntOr(const Value& obj, const char* key, int dflt) { return obj.has(key) ? obj.at(key).integer() : dflt; }

void RunScript(const Value& script) {
  const std::string name = script.at("name").str();
  ModelGate<std::string> gate(smdp::ParsePolicyLine(script.at("rule").str()), IntOr(script, "slots", 1),
                              IntOr(script, "max_queue", 1024));
  std::map<std::string, std::unique_ptr<P>> pending;  // the requests' memory, by id
  double now = 0;
  int i = 0;
  for (const Value& ev : script.at("events").items()) {
    g_where = "script '" + name + "', event " + std::to_string(i++);
    if (ev.has("at")) {
      now = ev.at("at").num();
    } else if (ev.has("arrive")) {
      std::vector<std::string> refused;
      for (const Value& spec : ev.at("arrive").items()) {
        auto p = std::make_unique<P>();
        p->arrival = now;
        p->key = "k";
        if (spec.is_string()) {
          p->payload = spec.str();
        } else {
          p->payload = spec.at("id").str();
          if (const Value* k = spec.find("key")) p->key = k->is_null() ? "" : k->str();
          if (const Value* a = spec.find("arrival")) p->arrival = a->num();
          p->rows = IntOr(spec, "rows", 1);
          p->priority = IntOr(spec, "priority", 0);
          if (const Value* d = spec.find("deadline"))
            if (!d->is_null()) p->deadline = d->num();
        }
        if (gate.Submit(p.get())) pending[p->payload] = std::move(p);
        else refused.push_back(p->payload);
      }
      CHECK(refused == Strings(ev.find("refused")));
    } else if (ev.has("cancel")) {
      CHECK(gate.Cancel(pending.at(ev.at("cancel").str()).get()) == ev.at("cancelled").truth());
    } else if (ev.has("complete")) {
      bool threw = false;
      try {
        for (int k = 0; k < ev.at("complete").integer(); ++k) gate.Complete();
      } catch (const std::logic_error&) {
        threw = true;
      }
      CHECK(threw == (ev.has("fails") && ev.at("fails").truth()));
    } else if (ev.has("rule")) {
      gate.SetPolicy(smdp::ParsePolicyLine(ev.at("rule").str()));
    } else if (ev.has("slots")) {
      gate.SetSlots(ev.at("slots").integer());
    } else if (ev.has("poll")) {
      const Value& want = ev.at("poll");
      auto step = gate.Poll(now);
      std::vector<std::vector<std::string>> batches, want_batches;
      for (auto& b : step.batches) batches.push_back(Ids(b));
      if (const Value* wb = want.find("batches"))
        for (const Value& b : wb->items()) want_batches.push_back(Strings(&b));
      CHECK(batches == want_batches);
      std::vector<std::string> reasons(step.reasons.begin(), step.reasons.end());
      std::vector<std::string> want_reasons =
          want.has("reasons") ? Strings(want.find("reasons")) : std::vector<std::string>(batches.size(), "policy");
      CHECK(reasons == want_reasons);
      CHECK(Ids(step.expired) == Strings(want.find("expired")));
      const Value* wake = want.find("wake_at");
      if (wake == nullptr || wake->is_null()) CHECK(std::isinf(step.wake_at));
      else CHECK(std::fabs(step.wake_at - wake->num()) < 1e-9);
      for (P* p : step.expired) pending.erase(p->payload);  // answered: the caller's memory goes
    } else if (ev.has("state")) {
      const Value& want = ev.at("state");
      if (want.has("queue")) CHECK(gate.queue_length() == want.at("queue").integer());
      if (want.has("in_flight")) CHECK(gate.in_flight() == want.at("in_flight").integer());
      if (want.has("slots")) CHECK(gate.slots() == want.at("slots").integer());
      if (const Value* counters = want.find("counters")) {
        const smdp::GateCounters& c = gate.counters();
        const std::map<std::string, uint64_t> got{
            {"submitted", c.submitted}, {"rejected", c.rejected}, {"cancelled", c.cancelled},
            {"expired", c.expired}, {"dispatched_requests", c.dispatched_requests},
            {"dispatched_batches", c.dispatched_batches}, {"decisions_wait", c.decisions_wait},
            {"decisions_serve", c.decisions_serve}};
        for (const auto& kv : counters->object) {
          g_where += ", counter " + kv.first;
          CHECK(got.count(kv.first) == 1 && got.at(kv.first) == static_cast<uint64_t>(kv.second.integer()));
        }
      }
    } else {
      CHECK(!"a known event");
    }
  }
}

// Every vector file in `dir`: each may hold lines, errors, decisions and scripts. Returns how many
// files it read (0 is a failure: the vectors were not found).
int RunVectors(const std::string& dir) {
  int files = 0;
  std::vector<std::filesystem::path> paths;
  for (const auto& entry : std::filesystem::directory_iterator(dir))
    if (entry.path().extension() == ".json") paths.push_back(entry.path());
  std::sort(paths.begin(), paths.end());
  for (const auto& path : paths) {
    std::ifstream in(path);
    std::stringstream text;
    text << in.rdbuf();
    Value doc = json_lite::Parse(text.str());
    ++files;
    if (const Value* v = doc.find("lines")) RunLines(*v);
    if (const Value* v = doc.find("errors")) RunErrors(*v);
    if (const Value* v = doc.find("decisions")) RunDecisions(*v);
    if (const Value* v = doc.find("scripts"))
      for (const Value& s : v->items()) RunScript(s);
  }
  g_where.clear();
  return files;
}

// -- merging and splitting ------------------------------------------------------------------------

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

int main(int argc, char** argv) {
  const std::string dir = argc > 1 ? argv[1] : SMDP_VECTORS_DIR;
  try {
    int files = RunVectors(dir);
    CHECK(files > 0);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "vectors in %s: %s\n", dir.c_str(), e.what());
    CHECK(!"the vectors are readable");
  }
  TestMergeKey();
  TestMergeAndSplit();
  std::printf("%d checks, %d failed\n", g_checks, g_failed);
  return g_failed == 0 ? 0 : 1;
}
