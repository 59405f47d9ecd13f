/* Copyright (c) 2025, megasyne authors.
 *
 * Packed sample index of one source for one epoch, Megatron GPTDataset layout.
 *
 * The epoch is the concatenation of the source's documents in the epoch's order.
 * Samples are seq_length + 1 tokens and consecutive samples overlap by one token
 * (the last label of sample k is the first input of sample k + 1), so sample k
 * starts at token k * seq_length of the stream. The epoch holds
 * num_samples = (num_tokens - 1) / seq_length samples (a partial last one is
 * dropped, as Megatron's drop_last_partial_sequence).
 *
 * Output: [num_samples + 1, 2] of T: row k = (position in the epoch's document
 * order, offset in that document) of token k * seq_length. Sample k is the tokens
 * from row k up to and including row k + 1 -- exactly Megatron's sample_idx for a
 * single epoch, add_extra_token_to_sequence=1. Zero-length documents never hold a
 * boundary. One pass over documents: O(num_docs + num_samples).
 *
 * The _ordered variants take the lengths in document-id order plus the epoch's
 * document order, and read lengths[order[p]] in the loop instead of needing a
 * gathered copy (Megatron's sizes + document_idx interface).
 */
#include "index_builders.h"

#include <algorithm>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

namespace megasyne {

namespace {

constexpr int64_t kPrefetchDistance = 32;  // documents ahead (~ memory latency / loop cost)

// Document p of the epoch has length lengths[order[p]] (or lengths[p] without order).
// One pass: every boundary k * seq_length that falls inside a document is placed, so
// the rows come out as exactly num_samples + 1 without knowing the total first (a
// first pass over lengths[order[p]] would cost a second round of random reads).
template <typename T, bool kOrdered>
py::array_t<T> build_sample_index_impl(const py::array_t<int32_t, py::array::c_style> &lengths_,
                                       const py::array_t<T, py::array::c_style> *order_,
                                       const int64_t seq_length) {
  if (lengths_.ndim() != 1 || (kOrdered && order_->ndim() != 1)) {
    throw std::invalid_argument("build_sample_index: lengths and order must be 1-D");
  }
  if (seq_length < 1) {
    throw std::invalid_argument("build_sample_index: seq_length must be >= 1");
  }
  const int32_t *lengths = lengths_.data();
  const int64_t num_lengths = lengths_.shape(0);
  const T *order = kOrdered ? order_->data() : nullptr;
  const int64_t num_docs = kOrdered ? order_->shape(0) : num_lengths;

  // Capacity: exact when the epoch reads every document once; grows otherwise. The rows
  // are written through a raw pointer: a push_back checks the capacity for every entry, a
  // cost that shows in a loop this short (the growth check below runs once per row).
  int64_t all_tokens = 0;
  for (int64_t d = 0; d < num_lengths; ++d) {
    all_tokens += lengths[d] > 0 ? lengths[d] : 0;
  }
  // new T[] leaves the memory uninitialised: no zero-filling pass over the whole output.
  int64_t capacity = 2 * (all_tokens / seq_length + 2);
  std::unique_ptr<T[]> rows(new T[capacity]);
  T *out = rows.get();

  int64_t bad_position = -1;  // first position with an invalid document id or length
  int64_t doc_start = 0;      // stream position of document p's first token
  int64_t written = 0;        // entries of out written so far
  {
    py::gil_scoped_release release;
    int64_t next_token = 0;   // the next boundary, k * seq_length
    for (int64_t p = 0; p < num_docs; ++p) {
      if (kOrdered && p + kPrefetchDistance < num_docs) {
        // A shuffled order makes lengths[order[p]] a cache miss per document; ask for it
        // early (a stale or out-of-range id here only wastes the hint, never faults).
        const int64_t ahead = static_cast<int64_t>(order[p + kPrefetchDistance]);
#if defined(__GNUC__) || defined(__clang__)
        if (ahead >= 0 && ahead < num_lengths) __builtin_prefetch(lengths + ahead);
#else
        (void)ahead;
#endif
      }
      const int64_t d = kOrdered ? static_cast<int64_t>(order[p]) : p;
      if (d < 0 || d >= num_lengths || lengths[d] < 0) {
        bad_position = p;
        break;
      }
      const int64_t doc_end = doc_start + lengths[d];
      while (next_token < doc_end) {  // every boundary that falls inside document p
        if (written + 2 > capacity) {  // only when the order repeats documents
          capacity = 2 * capacity + 2;
          std::unique_ptr<T[]> grown(new T[capacity]);
          std::copy(out, out + written, grown.get());
          rows = std::move(grown);
          out = rows.get();
        }
        out[written] = static_cast<T>(p);
        out[written + 1] = static_cast<T>(next_token - doc_start);
        written += 2;
        next_token += seq_length;
      }
      doc_start = doc_end;
    }
  }
  if (bad_position >= 0) {
    const int64_t d = kOrdered ? static_cast<int64_t>(order[bad_position]) : bad_position;
    throw std::invalid_argument(
        "build_sample_index: position " + std::to_string(bad_position) + ": " +
        (d < 0 || d >= num_lengths
             ? "document id " + std::to_string(d) + " out of range (document ids must be in [0, " +
                   std::to_string(num_lengths) + "))"
             : "negative length of document " + std::to_string(d)));
  }
  const int64_t num_tokens = doc_start;
  if (num_tokens < seq_length + 1) {
    throw std::invalid_argument("build_sample_index: " + std::to_string(num_tokens) +
                                " tokens cannot hold one sample of seq_length + 1 = " +
                                std::to_string(seq_length + 1) + " tokens");
  }
  // Boundaries were placed for every k with k * seq_length <= num_tokens - 1.
  const int64_t num_samples = (num_tokens - 1) / seq_length;
  if (written != 2 * (num_samples + 1)) {
    throw std::logic_error("build_sample_index: internal error, row count mismatch");
  }
  // The array views the first `written` entries; the (at most few) spare ones are freed with it.
  return owning_array<T>(std::move(rows), {num_samples + 1, 2});
}

template <typename T>
py::array_t<T> build_sample_index(const py::array_t<int32_t, py::array::c_style> &lengths,
                                  const int64_t seq_length) {
  return build_sample_index_impl<T, false>(lengths, nullptr, seq_length);
}

template <typename T>
py::array_t<T> build_sample_index_ordered(const py::array_t<int32_t, py::array::c_style> &lengths,
                                          const py::array_t<T, py::array::c_style> &order,
                                          const int64_t seq_length) {
  return build_sample_index_impl<T, true>(lengths, &order, seq_length);
}

}  // namespace

void register_sample_index(py::module_ &m) {
  const char *doc =
      "Packed sample index of one epoch: int32 document lengths in epoch order [D], "
      "seq_length -> [(num_tokens - 1) // seq_length + 1, 2] (document position, offset) "
      "of token k * seq_length. Use megasyne.data.index_builders.build_sample_index.";
  m.def("build_sample_index_int32", &build_sample_index<int32_t>, py::arg("lengths"),
        py::arg("seq_length"), doc);
  m.def("build_sample_index_int64", &build_sample_index<int64_t>, py::arg("lengths"),
        py::arg("seq_length"), doc);
  const char *doc_ordered =
      "Same, with the epoch's document order given separately: int32 lengths in document-id "
      "order [D'], order [D] of T (document ids) -> the index of documents order[0], order[1], "
      "... (no gathered copy of the lengths).";
  m.def("build_sample_index_ordered_int32", &build_sample_index_ordered<int32_t>,
        py::arg("lengths"), py::arg("order"), py::arg("seq_length"), doc_ordered);
  m.def("build_sample_index_ordered_int64", &build_sample_index_ordered<int64_t>,
        py::arg("lengths"), py::arg("order"), py::arg("seq_length"), doc_ordered);
}

}  // namespace megasyne
