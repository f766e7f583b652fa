// Merging the requests of one batch into one Triton request, and splitting its response back.
//
// The C++ twin of plugin/merge.py, limited to what the native data plane merges: raw tensor
// contents (what tritonclient sends), every input batched along dimension 0. Anything else gets an
// empty merge key and goes to Triton alone, unchanged, so it is never wrong, only unmerged.
#pragma once

#include <string>
#include <vector>

#include "grpc_service.pb.h"

namespace smdp {

// Equal non-empty keys mean the requests may share one Triton call. Sets *rows to the batch rows
// the request carries (dimension 0 of its inputs). Empty for a request that must go alone:
// typed (non-raw) contents, sequence or custom parameters, inputs disagreeing on dimension 0.
std::string MergeKey(const inference::ModelInferRequest& req, int* rows);

// One request carrying every member's rows in order. Priority and timeout parameters are not
// copied: the caller stamps what the batch needs.
inference::ModelInferRequest MergeRequests(const std::vector<const inference::ModelInferRequest*>& members,
                                           const std::vector<int>& rows);

// Split a merged response into one response per member (rows[i] rows each, ids restored).
// Returns false with *error set when an output cannot be split by rows.
bool SplitResponse(const inference::ModelInferResponse& merged,
                   const std::vector<const inference::ModelInferRequest*>& members, const std::vector<int>& rows,
                   std::vector<inference::ModelInferResponse>* out, std::string* error);

}  // namespace smdp
