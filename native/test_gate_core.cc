// Unit tests of the native gate's decision core and of merging/splitting, with no network and a
// hand-driven clock. Both run the shared vectors (tests/vectors/*.json, format in its README.md),
// which tests/test_vectors.py runs against the Python plane: both planes give one set of answers. Run: make -C native test (pytest runs it too). Usage: test_gate_core [VECTORS_DIR]
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <limits>
#include <map>
#include <memory>
#include <sstream>
#include <string>
#include <vector>

#include <google/protobuf/util/json_util.h>
#include <google/protobuf/util/message_differencer.h>

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
      const double never = std::numeric_limits<double>::infinity();
      double since_newest = c.has("since_newest") ? c.at("since_newest").num() : never;
      double group_age = c.has("group_age") ? c.at("group_age").num() : never;
      g_where = "rule " + g.at("rule").str() + ": n=" + std::to_string(n) + " wait=" + std::to_string(wait) +
                " busy=" + std::to_string(busy) + " since_newest=" + std::to_string(since_newest) +
                " group_age=" + std::to_string(group_age);
      double recheck = 0;
      const char* reason = nullptr;
      int serve = p.Decide(n, wait, &recheck, &reason, busy, since_newest, group_age);
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
            {"decisions_serve", c.decisions_serve}, {"decisions_held", c.decisions_held}};
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

// -- merging and splitting: the vectors' "merge_keys" and "merges" ------------------------------------

template <typename Message>
Message FromJson(const Value& v) {
  Message m;
  const auto status = google::protobuf::util::JsonStringToMessage(json_lite::Dump(v), &m);
  if (!status.ok()) throw std::runtime_error("not a " + m.GetTypeName() + ": " + std::string(status.message()));
  return m;
}

bool Same(const google::protobuf::Message& a, const google::protobuf::Message& b) {
  return google::protobuf::util::MessageDifferencer::Equals(a, b);
}

// Which requests share a merge key (one class each), which go alone, and each one's rows.
void RunMergeKeys(const Value& c) {
  g_where = "merge_keys: " + c.at("name").str();
  std::map<std::string, std::string> keys;
  std::map<std::string, int> rows;
  for (const Value& r : c.at("requests").items()) {
    auto req = FromJson<inference::ModelInferRequest>(r);
    int n = 0;
    keys[req.id()] = smdp::MergeKey(req, &n);
    rows[req.id()] = n;
  }
  for (const Value& id : c.at("alone").items()) CHECK(keys.at(id.str()).empty());
  for (const auto& [id, n] : c.at("rows").object) CHECK(!keys.at(id).empty() && rows.at(id) == n.integer());
  const auto& classes = c.at("classes").items();
  for (size_t i = 0; i < classes.size(); ++i) {
    const std::string& first = keys.at(classes[i].items().front().str());
    for (const Value& id : classes[i].items()) CHECK(keys.at(id.str()) == first);
    for (size_t j = i + 1; j < classes.size(); ++j) CHECK(keys.at(classes[j].items().front().str()) != first);
  }
}

// A batch's members merged into one request, and the merged response split back (or refused).
void RunMerge(const Value& c) {
  g_where = "merges: " + c.at("name").str();
  std::vector<inference::ModelInferRequest> reqs;
  for (const Value& r : c.at("requests").items()) reqs.push_back(FromJson<inference::ModelInferRequest>(r));
  std::vector<const inference::ModelInferRequest*> members;
  std::vector<int> rows;
  std::string key;
  for (const auto& r : reqs) {
    int n = 0;
    const std::string k = smdp::MergeKey(r, &n);
    CHECK(!k.empty() && (key.empty() || k == key));
    key = k;
    members.push_back(&r);
    rows.push_back(n);
  }
  const auto merged = smdp::MergeRequests(members, rows);
  if (const Value* want = c.find("merged")) CHECK(Same(merged, FromJson<inference::ModelInferRequest>(*want)));
  const auto response = FromJson<inference::ModelInferResponse>(c.at("response"));
  std::vector<inference::ModelInferResponse> parts;
  std::string err;
  const bool ok = smdp::SplitResponse(response, members, rows, &parts, &err);
  if (const Value* e = c.find("split_error"); e != nullptr && e->truth()) {
    CHECK(!ok && !err.empty());
    return;
  }
  CHECK(ok);
  const auto& want = c.at("split").items();
  CHECK(parts.size() == want.size());
  for (size_t i = 0; i < std::min(parts.size(), want.size()); ++i)
    CHECK(Same(parts[i], FromJson<inference::ModelInferResponse>(want[i])));
}

// What only the native plane does (so not in the shared vectors): typed contents go to Triton alone.
void TestTypedContentsGoAlone() {
  g_where.clear();
  inference::ModelInferRequest r;
  r.set_model_name("m");
  auto* in = r.add_inputs();
  in->set_name("INPUT0");
  in->set_datatype("FP32");
  in->add_shape(1);
  in->add_shape(2);
  in->mutable_contents()->add_fp32_contents(1.0f);
  in->mutable_contents()->add_fp32_contents(2.0f);
  int rows = 0;
  CHECK(smdp::MergeKey(r, &rows).empty());
}

// Every vector file in `dir`: each may hold lines, errors, decisions, scripts, merge_keys and merges. Returns how many
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
    if (const Value* v = doc.find("merge_keys"))
      for (const Value& c : v->items()) RunMergeKeys(c);
    if (const Value* v = doc.find("merges"))
      for (const Value& c : v->items()) RunMerge(c);
  }
  g_where.clear();
  return files;
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
  TestTypedContentsGoAlone();
  std::printf("%d checks, %d failed\n", g_checks, g_failed);
  return g_failed == 0 ? 0 : 1;
}
