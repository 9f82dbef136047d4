#include "core/safetensors.h"

#include <algorithm>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <limits>
#include <set>
#include <unistd.h>

#include <nlohmann/json.hpp>

#include "core/errors.h"

namespace nsa {

using nlohmann::json;

const Tensor* SafetensorsFile::find(const std::string& name) const {
  for (const auto& [n, t] : tensors)
    if (n == name) return &t;
  return nullptr;
}

void SafetensorsFile::set(const std::string& name, Tensor t) {
  for (auto& [n, existing] : tensors)
    if (n == name) { existing = std::move(t); return; }
  tensors.emplace_back(name, std::move(t));
}

namespace {

// The parser's message quotes the offending bytes, which may be invalid UTF-8: keep the error line ASCII.
std::string ascii_only(const std::string& s) {
  std::string out;
  for (const char c : s) {
    const auto u = static_cast<unsigned char>(c);
    if (u < 0x80) {
      out += c;
    } else {
      static const char kHex[] = "0123456789abcdef";
      out += {'\\', 'x', kHex[u >> 4], kHex[u & 15]};
    }
  }
  return out;
}

// JSON parsers keep one of two equal keys silently; the format forbids them, so we track keys per object.
json parse_header_json(const std::string& text, const std::string& origin) {
  // The parser stops at a NUL byte as if the input ended there; raw NUL is never valid JSON.
  if (const std::size_t nul = text.find('\0'); nul != std::string::npos)
    fail_input(origin, "", "header is not valid UTF-8 JSON (NUL byte at header offset " + std::to_string(nul) + ")");
  std::vector<std::set<std::string>> keys;
  std::string duplicate;
  std::size_t duplicate_depth = 0;
  auto on_event = [&](int, json::parse_event_t event, json& parsed) {
    if (event == json::parse_event_t::object_start) {
      keys.emplace_back();
    } else if (event == json::parse_event_t::object_end) {
      keys.pop_back();
    } else if (event == json::parse_event_t::key && !keys.back().insert(parsed.get<std::string>()).second &&
               duplicate.empty()) {
      duplicate = parsed.get<std::string>();
      duplicate_depth = keys.size();
    }
    return true;
  };
  json header;
  try {
    header = json::parse(text, on_event);
  } catch (const json::exception& e) {
    fail_input(origin, "", "header is not valid UTF-8 JSON (" + ascii_only(e.what()) + ")");
  }
  if (duplicate_depth == 1) fail_input(origin, duplicate, "name appears twice in the header");
  if (!duplicate.empty()) fail_input(origin, "", "key '" + duplicate + "' appears twice in one header object");
  return header;
}

uint64_t checked_mul(uint64_t a, uint64_t b, const std::string& origin, const std::string& name) {
  if (a != 0 && b > std::numeric_limits<uint64_t>::max() / a) fail_input(origin, name, "shape overflows the byte size");
  return a * b;
}

uint64_t json_u64(const json& j, const std::string& origin, const std::string& name, const char* what) {
  if (!j.is_number_unsigned()) fail_input(origin, name, std::string(what) + " must be non-negative integers");
  return j.get<uint64_t>();
}

// The header length that a file's first 8 bytes state (little-endian).
uint64_t stated_header_length(const uint8_t* first8) {
  uint64_t len = 0;
  for (int i = 7; i >= 0; --i) len = (len << 8) | first8[i];
  return len;
}

// A file's header, checked against the file's size: its metadata and tensors with their data spans (relative
// to the data section) but no bytes yet, in data-offset order.
struct FileLayout {
  SafetensorsFile file;
  std::vector<std::pair<uint64_t, uint64_t>> spans;  // [begin, end) of file.tensors[i]
  uint64_t data_start = 0;                           // file offset of the data section
};

// `data` holds the file's first min(size, 8 + header length) bytes at least; `size` is the whole file's.
FileLayout parse_layout(const uint8_t* data, uint64_t size, const std::string& origin) {
  if (size < 8) fail_input(origin, "", "file is shorter than the 8-byte header length (" + std::to_string(size) + " bytes)");
  const uint64_t header_len = stated_header_length(data);
  if (header_len > kMaxHeaderBytes)
    fail_input(origin, "", "header length " + std::to_string(header_len) + " exceeds the 100 MB limit");
  if (header_len > size - 8)
    fail_input(origin, "", "header length " + std::to_string(header_len) + " runs past the end of the file (" +
                               std::to_string(size) + " bytes)");
  const std::string text(reinterpret_cast<const char*>(data + 8), header_len);
  if (text.empty() || text[0] != '{') fail_input(origin, "", "header does not start with '{'");
  const json header = parse_header_json(text, origin);
  if (!header.is_object()) fail_input(origin, "", "header is not a JSON object");

  const uint64_t data_size = size - 8 - header_len;
  FileLayout layout;
  layout.data_start = 8 + header_len;
  SafetensorsFile& file = layout.file;
  struct Entry { uint64_t begin, end; std::string name; Tensor tensor; };
  std::vector<Entry> entries;
  for (const auto& [name, info] : header.items()) {
    if (name == "__metadata__") {
      if (!info.is_object()) fail_input(origin, "", "__metadata__ is not an object of strings");
      for (const auto& [key, value] : info.items()) {
        if (!value.is_string()) fail_input(origin, "", "__metadata__ value of '" + key + "' is not a string");
        file.metadata[key] = value.get<std::string>();
      }
      continue;
    }
    if (!info.is_object()) fail_input(origin, name, "header entry is not an object");
    for (const auto& [key, _] : info.items())
      if (key != "dtype" && key != "shape" && key != "data_offsets") fail_input(origin, name, "unknown header field '" + key + "'");
    if (!info.contains("dtype") || !info["dtype"].is_string()) fail_input(origin, name, "missing or non-string dtype");
    if (!info.contains("shape") || !info["shape"].is_array()) fail_input(origin, name, "missing or non-array shape");
    if (!info.contains("data_offsets") || !info["data_offsets"].is_array() || info["data_offsets"].size() != 2)
      fail_input(origin, name, "data_offsets must be [begin, end]");
    Entry e;
    e.name = name;
    try {
      e.tensor.dtype = dtype_from_name(info["dtype"].get<std::string>());
    } catch (const std::invalid_argument& ex) {
      fail_input(origin, name, ex.what());
    }
    uint64_t bytes = dtype_size(e.tensor.dtype);
    for (const auto& d : info["shape"]) {
      const uint64_t n = json_u64(d, origin, name, "shape dimensions");
      if (n > uint64_t(std::numeric_limits<int64_t>::max())) fail_input(origin, name, "shape dimension too large");
      bytes = checked_mul(bytes, n, origin, name);
      e.tensor.shape.push_back(int64_t(n));
    }
    e.begin = json_u64(info["data_offsets"][0], origin, name, "data_offsets");
    e.end = json_u64(info["data_offsets"][1], origin, name, "data_offsets");
    if (e.end < e.begin) fail_input(origin, name, "data_offsets end before they begin");
    if (e.end - e.begin != bytes)
      fail_input(origin, name, "data_offsets span " + std::to_string(e.end - e.begin) + " bytes but " +
                                   dtype_name(e.tensor.dtype) + " x " + shape_str(e.tensor.shape) + " needs " +
                                   std::to_string(bytes));
    if (e.end > data_size)
      fail_input(origin, name, "data_offsets end at " + std::to_string(e.end) + ", past the data section (" +
                                   std::to_string(data_size) + " bytes)");
    entries.push_back(std::move(e));
  }
  std::sort(entries.begin(), entries.end(), [](const Entry& a, const Entry& b) {
    return a.begin != b.begin ? a.begin < b.begin : a.end < b.end;
  });
  uint64_t expected = 0;
  for (const auto& e : entries) {
    if (e.begin < expected) fail_input(origin, e.name, "data overlaps the previous tensor");
    if (e.begin > expected) fail_input(origin, e.name, "gap in the data section before this tensor");
    expected = e.end;
  }
  if (expected != data_size)
    fail_input(origin, "", "data section has " + std::to_string(data_size - expected) + " trailing bytes no tensor covers");
  for (auto& e : entries) {
    file.tensors.emplace_back(e.name, std::move(e.tensor));
    layout.spans.emplace_back(e.begin, e.end);
  }
  return layout;
}

}  // namespace

SafetensorsFile parse_safetensors(const uint8_t* data, std::size_t size, const std::string& origin) {
  FileLayout layout = parse_layout(data, size, origin);
  const uint8_t* data_start = data + layout.data_start;
  for (std::size_t i = 0; i < layout.spans.size(); ++i)
    layout.file.tensors[i].second.bytes.assign(data_start + layout.spans[i].first, data_start + layout.spans[i].second);
  return std::move(layout.file);
}

std::vector<uint8_t> read_file_bytes(const std::string& path) {
  std::error_code ec;
  if (std::filesystem::is_directory(path, ec)) fail_input(path, "", "is a directory, not a file");
  std::ifstream in(path, std::ios::binary);
  if (!in) fail_input(path, "", "cannot open file");
  std::vector<uint8_t> bytes;
  try {  // the stream buffer throws on some read errors instead of setting badbit
    // A regular file is read in one piece at its size: growing the buffer while reading would briefly hold
    // twice the file (gigabytes for a 64k-token fixture). Anything else (a pipe) is read as a stream.
    const uintmax_t size = std::filesystem::is_regular_file(path, ec) ? std::filesystem::file_size(path, ec) : 0;
    if (!ec && size > 0) {
      bytes.resize(std::size_t(size));
      in.read(reinterpret_cast<char*>(bytes.data()), std::streamsize(size));
      bytes.resize(std::size_t(in.gcount()));  // a file that shrank meanwhile is read as it now is
      if (in.eof()) in.clear(in.rdstate() & ~(std::ios::eofbit | std::ios::failbit));
    } else {
      bytes.assign(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
    }
  } catch (const std::ios_base::failure& e) {
    fail_input(path, "", std::string("read error (") + e.what() + ")");
  }
  if (in.bad()) fail_input(path, "", "read error");
  return bytes;
}

SafetensorsFile read_safetensors(const std::string& path) {
  std::error_code ec;
  const uintmax_t size = std::filesystem::is_regular_file(path, ec) ? std::filesystem::file_size(path, ec) : 0;
  if (ec || size == 0) {  // not a regular file (a pipe), or empty: read whole, as a stream
    const std::vector<uint8_t> bytes = read_file_bytes(path);
    return parse_safetensors(bytes.data(), bytes.size(), path);
  }
  // A regular file is read in place: the header first, then each tensor's bytes straight into the tensor, so
  // that the file is never held beside its parsed tensors (gigabytes for a 64k-token fixture).
  std::ifstream in(path, std::ios::binary);
  if (!in) fail_input(path, "", "cannot open file");
  auto read = [&](uint8_t* dst, uint64_t n, const std::string& tensor) {
    try {  // the stream buffer throws on some read errors instead of setting badbit
      in.read(reinterpret_cast<char*>(dst), std::streamsize(n));
    } catch (const std::ios_base::failure& e) {
      fail_input(path, tensor, std::string("read error (") + e.what() + ")");
    }
    if (uint64_t(in.gcount()) != n) fail_input(path, tensor, "the file ended early (it changed while being read)");
  };
  std::vector<uint8_t> head(std::size_t(std::min<uintmax_t>(size, 8)));
  read(head.data(), head.size(), "");
  if (head.size() == 8) {
    const uint64_t header_len = stated_header_length(head.data());
    if (header_len <= kMaxHeaderBytes && header_len <= size - 8) {  // else parse_layout says what is wrong
      head.resize(std::size_t(8 + header_len));
      read(head.data() + 8, header_len, "");
    }
  }
  FileLayout layout = parse_layout(head.data(), size, path);
  for (std::size_t i = 0; i < layout.spans.size(); ++i) {  // in data-offset order, with no gaps: one pass
    auto& [name, tensor] = layout.file.tensors[i];
    tensor.bytes.resize(std::size_t(layout.spans[i].second - layout.spans[i].first));
    read(tensor.bytes.data(), tensor.bytes.size(), name);
  }
  return std::move(layout.file);
}

std::vector<uint8_t> serialize_safetensors(const SafetensorsFile& file) {
  json header = json::object();
  if (!file.metadata.empty()) header["__metadata__"] = file.metadata;
  uint64_t offset = 0;
  for (const auto& [name, t] : file.tensors) {
    if (t.bytes.size() != uint64_t(t.numel()) * dtype_size(t.dtype))
      throw std::logic_error("tensor '" + name + "' has a byte size that does not match its shape");
    header[name] = {{"dtype", dtype_name(t.dtype)}, {"shape", t.shape}, {"data_offsets", {offset, offset + t.bytes.size()}}};
    offset += t.bytes.size();
  }
  std::string text = header.dump();
  while (text.size() % 8) text.push_back(' ');  // keeps the data section 8-byte aligned
  std::vector<uint8_t> out;
  out.reserve(8 + text.size() + offset);
  for (int i = 0; i < 8; ++i) out.push_back(uint8_t(uint64_t(text.size()) >> (8 * i)));
  out.insert(out.end(), text.begin(), text.end());
  for (const auto& [_, t] : file.tensors) out.insert(out.end(), t.bytes.begin(), t.bytes.end());
  return out;
}

void write_file_atomic(const std::string& path, const std::vector<uint8_t>& bytes) {
  const std::string tmp = path + ".tmp." + std::to_string(::getpid());
  {
    std::ofstream out(tmp, std::ios::binary | std::ios::trunc);
    if (!out) fail_input(path, "", "cannot create output file");
    out.write(reinterpret_cast<const char*>(bytes.data()), std::streamsize(bytes.size()));
    out.flush();
    if (!out) {
      std::remove(tmp.c_str());
      fail_input(path, "", "write failed");
    }
  }
  if (std::rename(tmp.c_str(), path.c_str()) != 0) {
    std::remove(tmp.c_str());
    fail_input(path, "", "cannot rename temporary file into place");
  }
}

void write_safetensors(const std::string& path, const SafetensorsFile& file) {
  write_file_atomic(path, serialize_safetensors(file));
}

}  // namespace nsa
