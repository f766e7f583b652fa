// The native gate's decision core for one model: a bounded queue, in-flight slots and a batching rule.
//
// Plain code with no I/O and no clock of its own: every call takes `now` (seconds on any monotonic
// clock), so each decision can be tested without a network or a real clock. It decides as
// plugin/gate.py's ModelGate: the shared vectors (tests/vectors/, run by test_gate_core.cc and by
// tests/test_vectors.py) hold both to the same answers. The server calls Poll() at each
// decision epoch (an arrival, a completion, or a wake-up the core asked for) and carries out the
// Step it returns. Not thread-safe: the server holds the model's mutex around every call.
//
// Unlike the Python gate, nothing here keeps a request the gate has let go of: a cancelled, expired or
// dispatched request is unlinked from every structure at once, because its caller's memory is freed
// as soon as it is answered.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <deque>
#include <limits>
#include <map>
#include <optional>
#include <set>
#include <sstream>
#include <tuple>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

namespace smdp {

// The rule in force, solver.policy.GateRule: a stationary SMDP policy table a(n), n = 0..N, and
// min(n, beyond) above it (solver.policy.PolicyTable), optionally guarded (solver.policy.MaxWaitGuard):
// once the oldest request has waited max_wait_s, serve min(n, B) whatever the table says. Triton's own
// rule (solver.policy.TimeoutRule, "timeout:X") is the table a(n) = 0 below B, B from B on, guarded by X.
// Its text form (ParsePolicy, FormatPolicy) is GateRule.to_line's; tests/vectors/ holds both to it.
// k instances (solver.policy.InstanceTable): `table` is the row for m = 0 batches in flight and
// `busy_tables` the rows for m = 1, 2, ...; the last row serves every larger m; none: m is ignored.
// A group hold (solver.policy.GroupHold, hold_s > 0): a batch the table would start with all that
// waits, not a full one, waits until the newest request arrived hold_s ago, or kHoldSpan holds after
// its group's first member arrived (a group: arrivals each within hold_s of the one before).
constexpr double kHoldSpan = 4;  // solver.policy.HOLD_SPAN

struct Policy {
  std::vector<int> table{0, 1};  // greedy, B = 1
  std::vector<std::vector<int>> busy_tables;  // a(n, m) for m = 1, 2, ...
  int max_batch = 1;
  int beyond = 1;
  double max_wait_s = -1.0;      // < 0: no guard
  bool guard_is_timeout = false;  // the guard is Triton's timeout rule (reported "timeout", else "max_wait")
  double hold_s = 0.0;            // the group hold; 0: none

  // Throws std::invalid_argument naming the bad entry.
  void Validate() const {
    if (max_batch < 1) throw std::invalid_argument("max_batch must be >= 1, got " + std::to_string(max_batch));
    if (beyond < 1 || beyond > max_batch)
      throw std::invalid_argument("beyond must be in 1..B=" + std::to_string(max_batch) + ", got " +
                                  std::to_string(beyond));
    if (table.empty()) throw std::invalid_argument("policy table is empty");
    for (size_t n = 0; n < table.size(); ++n) {
      int a = table[n];
      if (a < 0 || a > std::min<int>(static_cast<int>(n), max_batch))
        throw std::invalid_argument("policy action a(" + std::to_string(n) + ") = " + std::to_string(a) +
                                    " is outside 0..min(" + std::to_string(n) + ", B=" +
                                    std::to_string(max_batch) + ")");
    }
    for (size_t m = 1; m <= busy_tables.size(); ++m) {
      const std::vector<int>& row = busy_tables[m - 1];
      if (row.empty()) throw std::invalid_argument("busy_tables row for m = " + std::to_string(m) + " is empty");
      for (size_t n = 0; n < row.size(); ++n) {
        int a = row[n];
        if (a < 0 || a > std::min<int>(static_cast<int>(n), max_batch))
          throw std::invalid_argument("busy_tables row for m = " + std::to_string(m) + ": policy action a(" +
                                      std::to_string(n) + ") = " + std::to_string(a) + " is outside 0..min(" +
                                      std::to_string(n) + ", B=" + std::to_string(max_batch) + ")");
      }
    }
    if (!(max_wait_s < 0.0) && !(max_wait_s < std::numeric_limits<double>::infinity()))
      throw std::invalid_argument("max_wait must be finite");
    if (!(hold_s >= 0.0 && hold_s < std::numeric_limits<double>::infinity()))
      throw std::invalid_argument("hold must be finite and >= 0 seconds");
  }

  // The row in force with `busy` batches in flight (GateRule.row).
  const std::vector<int>& Row(int busy) const {
    if (busy <= 0 || busy_tables.empty()) return table;
    return busy_tables[std::min<size_t>(static_cast<size_t>(busy), busy_tables.size()) - 1];
  }

  // Batch size to serve with n waiting, the oldest waiting for `oldest_wait_s`, `busy` batches in
  // flight, the newest request arrived `since_newest_s` ago and its group's first `group_age_s` ago;
  // 0 = wait. `recheck_s` is set (>= 0) when waiting should be re-decided after that long. A held
  // batch is a wait with reason "hold" (GateRule.decide).
  int Decide(int n, double oldest_wait_s, double* recheck_s, const char** reason = nullptr, int busy = 0,
             double since_newest_s = std::numeric_limits<double>::infinity(),
             double group_age_s = std::numeric_limits<double>::infinity()) const {
    *recheck_s = -1.0;
    if (reason) *reason = "policy";
    if (n <= 0) return 0;
    if (max_wait_s >= 0.0 && oldest_wait_s >= max_wait_s) {
      int a = std::min(n, max_batch);
      // As solver.policy: the timeout rule serves a full batch as "policy", a timed-out one as "timeout"
      if (reason && !(guard_is_timeout && a >= max_batch)) *reason = guard_is_timeout ? "timeout" : "max_wait";
      return a;
    }
    const std::vector<int>& row = Row(busy);
    int a = static_cast<size_t>(n) < row.size() ? row[n] : std::min(n, beyond);
    if (a == 0) {
      if (max_wait_s >= 0.0) *recheck_s = max_wait_s - oldest_wait_s;
      return 0;
    }
    if (hold_s > 0.0 && a >= n && n < max_batch) {
      double left = std::min(hold_s - since_newest_s, kHoldSpan * hold_s - group_age_s);
      if (left > 0.0) {
        *recheck_s = max_wait_s >= 0.0 ? std::min(left, max_wait_s - oldest_wait_s) : left;
        if (reason) *reason = "hold";
        return 0;
      }
    }
    return a;
  }
};

// Integers separated by commas, as Python's split and int read them (no empty entry, nothing but the
// number in each); std::invalid_argument(bad) otherwise. An empty text is an empty list.
inline std::vector<int> ParseIntList(const std::string& text, const std::string& bad) {
  if (!text.empty() && text.back() == ',') throw std::invalid_argument(bad);
  std::vector<int> out;
  std::istringstream in(text);
  std::string a;
  while (std::getline(in, a, ',')) {
    size_t used = 0;
    int v = 0;
    try {
      v = std::stoi(a, &used);
    } catch (const std::exception&) {
      used = 0;
    }
    if (used == 0 || used != a.size()) throw std::invalid_argument(bad);
    out.push_back(v);
  }
  return out;
}

// Parse the rule's fields of a `policy` command (GateRule.from_fields), erasing each one it reads so
// that the caller can refuse what is left: max_batch=B [beyond=b] table=a0,a1,... [busy_tables=...]
// [max_wait_us=U] [guard_reason=timeout|max_wait] [hold_us=H]. Throws std::invalid_argument naming a bad field; validates.
inline Policy ParsePolicy(std::map<std::string, std::string>* f) {
  auto integer = [f](const std::string& key, const int* dflt) {
    auto it = f->find(key);
    if (it == f->end()) {
      if (dflt == nullptr) throw std::invalid_argument(key + "= missing");
      return *dflt;
    }
    size_t used = 0;
    int v = 0;
    try {
      v = std::stoi(it->second, &used);
    } catch (const std::exception&) {
      used = 0;
    }
    if (used == 0 || used != it->second.size())
      throw std::invalid_argument(key + " must be an integer, got '" + it->second + "'");
    f->erase(it);
    return v;
  };
  Policy p;
  p.max_batch = integer("max_batch", nullptr);
  p.beyond = integer("beyond", &p.max_batch);
  const int none = -1;
  int wait_us = integer("max_wait_us", &none);
  p.max_wait_s = wait_us < 0 ? -1.0 : wait_us * 1e-6;
  const int zero = 0;
  int hold_us = integer("hold_us", &zero);
  if (hold_us < 0) throw std::invalid_argument("hold_us must be >= 0, got " + std::to_string(hold_us));
  p.hold_s = hold_us * 1e-6;
  auto why = f->find("guard_reason");
  if (why != f->end()) {
    if (why->second != "timeout" && why->second != "max_wait")
      throw std::invalid_argument("guard_reason must be timeout or max_wait, got '" + why->second + "'");
    p.guard_is_timeout = why->second == "timeout";
    f->erase(why);
  }
  auto t = f->find("table");
  if (t == f->end()) throw std::invalid_argument("table= missing");
  p.table = ParseIntList(t->second, "table must be integers separated by commas, got '" + t->second + "'");
  f->erase(t);
  auto bt = f->find("busy_tables");
  if (bt != f->end()) {
    const std::string bad = "busy_tables must be rows of integers separated by commas, rows separated by ';', got '" +
                            bt->second + "'";
    // as Python's split: an empty text, or one ending in ',' or ';', has an empty entry
    if (bt->second.empty() || bt->second.back() == ',' || bt->second.back() == ';') throw std::invalid_argument(bad);
    std::istringstream rin(bt->second);
    std::string row;
    while (std::getline(rin, row, ';')) {
      if (row.empty()) throw std::invalid_argument(bad);
      p.busy_tables.push_back(ParseIntList(row, bad));
    }
    f->erase(bt);
  }
  p.Validate();
  return p;
}

// A whole rule line (GateRule.from_line): only the rule's fields, each once as key=value.
inline Policy ParsePolicyLine(const std::string& line) {
  std::map<std::string, std::string> f;
  std::istringstream in(line);
  std::string tok;
  while (in >> tok) {
    auto eq = tok.find('=');
    if (eq == std::string::npos || eq == 0) throw std::invalid_argument("expected key=value, got '" + tok + "'");
    f[tok.substr(0, eq)] = tok.substr(eq + 1);
  }
  Policy p = ParsePolicy(&f);
  if (!f.empty()) throw std::invalid_argument("unknown key '" + f.begin()->first + "'");
  return p;
}

// The canonical text of a rule (GateRule.to_line).
inline std::string FormatPolicy(const Policy& p) {
  std::string out = "max_batch=" + std::to_string(p.max_batch) + " beyond=" + std::to_string(p.beyond) + " table=";
  for (size_t i = 0; i < p.table.size(); ++i) out += (i ? "," : "") + std::to_string(p.table[i]);
  for (size_t m = 0; m < p.busy_tables.size(); ++m) {
    out += m ? ";" : " busy_tables=";
    for (size_t i = 0; i < p.busy_tables[m].size(); ++i) out += (i ? "," : "") + std::to_string(p.busy_tables[m][i]);
  }
  if (p.max_wait_s >= 0.0)
    out += " max_wait_us=" + std::to_string(std::llround(p.max_wait_s * 1e6)) +
           " guard_reason=" + (p.guard_is_timeout ? "timeout" : "max_wait");
  if (p.hold_s > 0.0) out += " hold_us=" + std::to_string(std::llround(p.hold_s * 1e6));
  return out;
}

template <typename T>
struct Pending {
  std::string key;      // requests with equal non-empty keys may share a batch; empty goes alone
  double arrival = 0;   // seconds, the caller's clock
  int rows = 1;         // batch-dimension rows this request carries
  int priority = 0;     // queue level, lower is more urgent (Triton's convention)
  double deadline = std::numeric_limits<double>::infinity();
  T payload{};          // opaque to the core
  uint64_t seq = 0;
  bool live = false;
};

template <typename T>
struct Step {
  std::vector<std::vector<Pending<T>*>> batches;  // one in-flight slot each, members oldest first
  std::vector<Pending<T>*> expired;               // deadline passed while waiting
  std::vector<const char*> reasons;               // why each batch was served, parallel to `batches`
  double wake_at = std::numeric_limits<double>::infinity();
};

struct GateCounters {
  uint64_t submitted = 0, rejected = 0, cancelled = 0, expired = 0;
  uint64_t dispatched_requests = 0, dispatched_batches = 0, decisions_wait = 0, decisions_serve = 0;
  uint64_t decisions_held = 0;  // waits that held a batch for the rest of a group (also in decisions_wait)
};

template <typename T>
class ModelGate {
 public:
  ModelGate(Policy policy, int slots, int max_queue) : policy_(std::move(policy)) {
    policy_.Validate();
    if (slots < 1) throw std::invalid_argument("slots must be >= 1, got " + std::to_string(slots));
    if (max_queue < 1) throw std::invalid_argument("max_queue must be >= 1, got " + std::to_string(max_queue));
    slots_ = free_ = slots;
    max_queue_ = max_queue;
  }

  const Policy& policy() const { return policy_; }
  // Takes effect at the next decision, never inside one.
  void SetPolicy(Policy p) {
    p.Validate();
    policy_ = std::move(p);
  }
  void SetSlots(int slots) {
    if (slots < 1) throw std::invalid_argument("slots must be >= 1, got " + std::to_string(slots));
    free_ += slots - slots_;
    slots_ = slots;
  }
  void SetMaxQueue(int q) {
    if (q < 1) throw std::invalid_argument("max_queue must be >= 1, got " + std::to_string(q));
    max_queue_ = q;
  }
  int queue_length() const { return size_; }
  int in_flight() const { return slots_ - free_; }
  int slots() const { return slots_; }
  const GateCounters& counters() const { return counters_; }

  // Queue a request; false (and nothing queued) at the bound: the caller answers RESOURCE_EXHAUSTED.
  bool Submit(Pending<T>* p) {
    if (size_ >= max_queue_) {
      ++counters_.rejected;
      return false;
    }
    p->seq = seq_++;
    p->live = true;
    if (p->arrival - newest_ > policy_.hold_s) group_start_ = p->arrival;
    newest_ = std::max(newest_, p->arrival);
    levels_[p->priority].push_back(p);
    ++size_;
    ++counters_.submitted;
    if (p->deadline < std::numeric_limits<double>::infinity()) deadlines_.insert({p->deadline, p->seq, p});
    return true;
  }

  // Withdraw a waiting request (its caller went away); false if it was already dispatched.
  bool Cancel(Pending<T>* p) {
    if (!p->live) return false;
    Unlink(p);
    --size_;
    ++counters_.cancelled;
    return true;
  }

  // A dispatched batch finished (successfully or not): its slot is free again.
  void Complete() {
    if (free_ >= slots_) throw std::logic_error("Complete() without a batch in flight");
    ++free_;
  }

  // Every decision due now: drop expired requests, then fill free slots by the rule.
  Step<T> Poll(double now) {
    Step<T> step;
    Expire(now, &step.expired);
    while (free_ > 0 && size_ > 0) {
      double recheck = -1.0;
      const char* reason = "policy";
      int serve = policy_.Decide(size_, now - OldestArrival(), &recheck, &reason, slots_ - free_, now - newest_,
                                 now - group_start_);
      if (serve <= 0) {
        ++counters_.decisions_wait;
        if (std::strcmp(reason, "hold") == 0) ++counters_.decisions_held;
        if (recheck >= 0.0) step.wake_at = now + recheck;
        break;
      }
      ++counters_.decisions_serve;
      step.batches.push_back(Take(std::min(serve, size_)));
      step.reasons.push_back(reason);
      --free_;
      ++counters_.dispatched_batches;
      counters_.dispatched_requests += step.batches.back().size();
    }
    double d = NextDeadline();
    if (d < step.wake_at) step.wake_at = d;
    return step;
  }

 private:
  using DeadlineEntry = std::tuple<double, uint64_t, Pending<T>*>;

  // Remove a waiting request from its level's queue and from the deadlines.
  void Unlink(Pending<T>* p) {
    p->live = false;
    auto& q = levels_[p->priority];
    auto it = std::find(q.begin(), q.end(), p);
    if (it != q.end()) q.erase(it);
    if (p->deadline < std::numeric_limits<double>::infinity()) deadlines_.erase({p->deadline, p->seq, p});
  }

  void Expire(double now, std::vector<Pending<T>*>* out) {
    while (!deadlines_.empty() && std::get<0>(*deadlines_.begin()) <= now) {
      Pending<T>* p = std::get<2>(*deadlines_.begin());
      Unlink(p);
      --size_;
      out->push_back(p);
      ++counters_.expired;
    }
  }

  double NextDeadline() const {
    return deadlines_.empty() ? std::numeric_limits<double>::infinity() : std::get<0>(*deadlines_.begin());
  }

  Pending<T>* Head(std::deque<Pending<T>*>& q) {
    while (!q.empty() && !q.front()->live) q.pop_front();
    return q.empty() ? nullptr : q.front();
  }

  double OldestArrival() {
    double oldest = std::numeric_limits<double>::infinity();
    for (auto& [level, q] : levels_)
      if (Pending<T>* h = Head(q)) oldest = std::min(oldest, h->arrival);
    return oldest;
  }

  // The `count` most urgent requests that can share a batch with the most urgent one; rows are
  // capped at B, since a request carrying several rows counts for all of them in Triton's batch.
  std::vector<Pending<T>*> Take(int count) {
    Pending<T>* head = nullptr;
    for (auto& [level, q] : levels_)
      if ((head = Head(q))) break;
    std::vector<Pending<T>*> taken;
    int rows = 0;
    const int max_rows = policy_.max_batch;
    for (auto& [level, q] : levels_) {
      std::vector<Pending<T>*> skipped;
      while (!q.empty() && static_cast<int>(taken.size()) < count) {
        Pending<T>* p = q.front();
        q.pop_front();
        if (!p->live) continue;
        if (p == head || (!head->key.empty() && p->key == head->key && rows + p->rows <= max_rows)) {
          p->live = false;
          if (p->deadline < std::numeric_limits<double>::infinity()) deadlines_.erase({p->deadline, p->seq, p});
          taken.push_back(p);
          rows += p->rows;
          if (head->key.empty()) break;
        } else {
          skipped.push_back(p);
          if (rows >= max_rows) break;
        }
      }
      for (auto it = skipped.rbegin(); it != skipped.rend(); ++it) q.push_front(*it);
      if (static_cast<int>(taken.size()) >= count || head->key.empty() || rows >= max_rows) break;
    }
    size_ -= static_cast<int>(taken.size());
    return taken;
  }

  Policy policy_;
  int slots_ = 1, free_ = 1, max_queue_ = 1, size_ = 0;
  uint64_t seq_ = 0;
  double newest_ = -std::numeric_limits<double>::infinity();       // when the newest request arrived
  double group_start_ = -std::numeric_limits<double>::infinity();  // when its group's first arrived
  std::map<int, std::deque<Pending<T>*>> levels_;
  std::set<DeadlineEntry> deadlines_;  // waiting requests with a deadline, earliest first
  GateCounters counters_;
};

}  // namespace smdp
