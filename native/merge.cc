#include "merge.h"

#include <cstring>
#include <map>
#include <set>

namespace smdp {
namespace {

const std::set<std::string> kPerCaller{"priority", "timeout"};

int DtypeSize(const std::string& dt) {
  static const std::map<std::string, int> sizes{
      {"BOOL", 1}, {"INT8", 1},  {"UINT8", 1},  {"INT16", 2},  {"UINT16", 2}, {"FP16", 2}, {"BF16", 2},
      {"INT32", 4}, {"UINT32", 4}, {"FP32", 4}, {"INT64", 8}, {"UINT64", 8}, {"FP64", 8}, {"BYTES", 0}};
  auto it = sizes.find(dt);
  return it == sizes.end() ? -1 : it->second;
}

// Parameters as a canonical string (map order is not fixed on the wire): kind and value of each.
std::string ParamsKey(const google::protobuf::Map<std::string, inference::InferParameter>& params,
                      bool skip_per_caller, bool* ok) {
  std::map<std::string, std::string> sorted;
  for (const auto& [k, v] : params) {
    if (skip_per_caller && kPerCaller.count(k)) continue;
    if (k.rfind("sequence_", 0) == 0 || k.rfind("shared_memory_", 0) == 0) *ok = false;
    std::string s;
    v.SerializeToString(&s);  // deterministic for a one-field message
    sorted.emplace(k, std::move(s));
  }
  std::string out;
  for (const auto& [k, v] : sorted) {
    out += k;
    out += '\x1f';
    out += v;
    out += '\x1e';
  }
  return out;
}

int64_t Elements(const google::protobuf::RepeatedField<int64_t>& shape, int from) {
  int64_t n = 1;
  for (int i = from; i < shape.size(); ++i) n *= shape[i];
  return n;
}

// Byte length of `count` length-prefixed BYTES elements starting at `pos`, or -1 if they overrun.
int64_t BytesSpan(const std::string& raw, size_t pos, int64_t count) {
  size_t p = pos;
  for (int64_t i = 0; i < count; ++i) {
    if (p + 4 > raw.size()) return -1;
    uint32_t len;
    std::memcpy(&len, raw.data() + p, 4);  // little-endian on every platform Triton runs on
    p += 4 + static_cast<size_t>(len);
    if (p > raw.size()) return -1;
  }
  return static_cast<int64_t>(p - pos);
}

}  // namespace

std::string MergeKey(const inference::ModelInferRequest& req, int* rows) {
  *rows = 1;
  if (req.inputs_size() == 0 || req.raw_input_contents_size() != req.inputs_size()) return "";
  bool ok = true;
  std::string key = req.model_name();
  key += '\x1d';
  key += req.model_version();
  key += '\x1d';
  key += ParamsKey(req.parameters(), true, &ok);
  int64_t dim0 = -1;
  for (int i = 0; i < req.inputs_size(); ++i) {
    const auto& in = req.inputs(i);
    if (in.shape_size() == 0 || in.has_contents() || DtypeSize(in.datatype()) < 0) return "";
    if (in.shape(0) < 1 || (dim0 >= 0 && in.shape(0) != dim0)) return "";
    dim0 = in.shape(0);
    for (int64_t d : in.shape())
      if (d < 0) return "";
    int size = DtypeSize(in.datatype());
    int64_t want = Elements(in.shape(), 0) * size;
    if (size > 0 && static_cast<int64_t>(req.raw_input_contents(i).size()) != want) return "";
    key += in.name();
    key += '\x1f';
    key += in.datatype();
    for (int d = 1; d < in.shape_size(); ++d) key += '\x1f' + std::to_string(in.shape(d));
    key += '\x1f';
    key += ParamsKey(in.parameters(), false, &ok);
    key += '\x1e';
  }
  key += '\x1d';
  for (const auto& out : req.outputs()) {
    key += out.name();
    key += '\x1f';
    key += ParamsKey(out.parameters(), false, &ok);
    key += '\x1e';
  }
  if (!ok || dim0 > std::numeric_limits<int>::max()) return "";
  *rows = static_cast<int>(dim0);
  return key;
}

inference::ModelInferRequest MergeRequests(const std::vector<const inference::ModelInferRequest*>& members,
                                           const std::vector<int>& rows) {
  const auto& first = *members.front();
  inference::ModelInferRequest merged;
  merged.set_model_name(first.model_name());
  merged.set_model_version(first.model_version());
  for (const auto& [k, v] : first.parameters())
    if (!kPerCaller.count(k)) (*merged.mutable_parameters())[k] = v;
  *merged.mutable_outputs() = first.outputs();
  int total = 0;
  for (int r : rows) total += r;
  for (int i = 0; i < first.inputs_size(); ++i) {
    auto* in = merged.add_inputs();
    *in = first.inputs(i);
    in->set_shape(0, total);
    std::string* raw = merged.add_raw_input_contents();
    size_t bytes = 0;
    for (const auto* m : members) bytes += m->raw_input_contents(i).size();
    raw->reserve(bytes);
    for (const auto* m : members) raw->append(m->raw_input_contents(i));
  }
  return merged;
}

bool SplitResponse(const inference::ModelInferResponse& merged,
                   const std::vector<const inference::ModelInferRequest*>& members, const std::vector<int>& rows,
                   std::vector<inference::ModelInferResponse>* out, std::string* error) {
  int64_t total = 0;
  for (int r : rows) total += r;
  out->assign(members.size(), inference::ModelInferResponse());
  for (size_t m = 0; m < members.size(); ++m) {
    auto& r = (*out)[m];
    r.set_model_name(merged.model_name());
    r.set_model_version(merged.model_version());
    r.set_id(members[m]->id());
    *r.mutable_parameters() = merged.parameters();
  }
  if (merged.raw_output_contents_size() != merged.outputs_size()) {
    *error = "Triton answered with typed output contents; the gate splits raw outputs only";
    return false;
  }
  for (int o = 0; o < merged.outputs_size(); ++o) {
    const auto& spec = merged.outputs(o);
    const std::string& raw = merged.raw_output_contents(o);
    if (spec.shape_size() == 0 || spec.shape(0) != total) {
      *error = "output '" + spec.name() + "' has " + (spec.shape_size() ? std::to_string(spec.shape(0)) : "no") +
               " rows for a batch of " + std::to_string(total);
      return false;
    }
    const int size = DtypeSize(spec.datatype());
    const int64_t per_row = Elements(spec.shape(), 1);
    size_t pos = 0;
    for (size_t m = 0; m < members.size(); ++m) {
      int64_t len = size > 0 ? per_row * size * rows[m] : BytesSpan(raw, pos, per_row * rows[m]);
      if (size < 0 || len < 0 || pos + static_cast<size_t>(len) > raw.size()) {
        *error = "output '" + spec.name() + "' (" + spec.datatype() + ") cannot be split by rows";
        return false;
      }
      auto& r = (*out)[m];
      auto* t = r.add_outputs();
      *t = spec;
      t->set_shape(0, rows[m]);
      r.add_raw_output_contents()->assign(raw, pos, static_cast<size_t>(len));
      pos += static_cast<size_t>(len);
    }
    if (pos != raw.size()) {
      *error = "output '" + spec.name() + "' has " + std::to_string(raw.size() - pos) + " bytes beyond its rows";
      return false;
    }
  }
  return true;
}

}  // namespace smdp
