// A small JSON reader for the native unit tests' shared vectors (tests/vectors/*.json): objects,
// arrays, strings (\uXXXX escapes of the basic plane, as UTF-8), numbers, true/false/null. Throws
// std::runtime_error with the offset of the first thing it cannot read; Dump writes a value back as
// JSON. Not used by smdp-gate itself.
#pragma once

#include <cstdio>
#include <cstdlib>
#include <map>
#include <memory>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

namespace json_lite {

struct Value {
  enum class Type { kNull, kBool, kNumber, kString, kArray, kObject };
  Type type = Type::kNull;
  bool boolean = false;
  double number = 0;
  std::string string;
  std::vector<Value> array;
  std::vector<std::pair<std::string, Value>> object;  // in file order

  bool is_null() const { return type == Type::kNull; }
  bool is_string() const { return type == Type::kString; }
  bool is_array() const { return type == Type::kArray; }
  bool is_object() const { return type == Type::kObject; }
  // The member `key` of an object, or nullptr.
  const Value* find(const std::string& key) const {
    for (const auto& kv : object)
      if (kv.first == key) return &kv.second;
    return nullptr;
  }
  bool has(const std::string& key) const { return find(key) != nullptr; }
  const Value& at(const std::string& key) const {
    const Value* v = find(key);
    if (v == nullptr) throw std::runtime_error("json: no member '" + key + "'");
    return *v;
  }
  double num() const {
    if (type != Type::kNumber) throw std::runtime_error("json: not a number");
    return number;
  }
  int integer() const { return static_cast<int>(num()); }
  const std::string& str() const {
    if (type != Type::kString) throw std::runtime_error("json: not a string");
    return string;
  }
  bool truth() const {
    if (type != Type::kBool) throw std::runtime_error("json: not a boolean");
    return boolean;
  }
  const std::vector<Value>& items() const {
    if (type != Type::kArray) throw std::runtime_error("json: not an array");
    return array;
  }
};

class Parser {
 public:
  explicit Parser(const std::string& text) : s_(text) {}

  Value Parse() {
    Value v = ParseValue();
    Space();
    if (i_ != s_.size()) Fail("trailing characters");
    return v;
  }

 private:
  [[noreturn]] void Fail(const std::string& what) const {
    throw std::runtime_error("json: " + what + " at offset " + std::to_string(i_));
  }
  void Space() {
    while (i_ < s_.size() && (s_[i_] == ' ' || s_[i_] == '\n' || s_[i_] == '\r' || s_[i_] == '\t')) ++i_;
  }
  bool Eat(char c) {
    Space();
    if (i_ < s_.size() && s_[i_] == c) {
      ++i_;
      return true;
    }
    return false;
  }
  void Expect(char c) {
    if (!Eat(c)) Fail(std::string("expected '") + c + "'");
  }
  bool Word(const char* w) {
    size_t n = std::char_traits<char>::length(w);
    if (s_.compare(i_, n, w) == 0) {
      i_ += n;
      return true;
    }
    return false;
  }

  Value ParseValue() {
    Space();
    if (i_ >= s_.size()) Fail("unexpected end");
    Value v;
    char c = s_[i_];
    if (c == '{') {
      ++i_;
      v.type = Value::Type::kObject;
      if (Eat('}')) return v;
      do {
        Space();
        std::string key = ParseString();
        Expect(':');
        v.object.emplace_back(std::move(key), ParseValue());
      } while (Eat(','));
      Expect('}');
    } else if (c == '[') {
      ++i_;
      v.type = Value::Type::kArray;
      if (Eat(']')) return v;
      do v.array.push_back(ParseValue());
      while (Eat(','));
      Expect(']');
    } else if (c == '"') {
      v.type = Value::Type::kString;
      v.string = ParseString();
    } else if (Word("true")) {
      v.type = Value::Type::kBool;
      v.boolean = true;
    } else if (Word("false")) {
      v.type = Value::Type::kBool;
    } else if (Word("null")) {
      v.type = Value::Type::kNull;
    } else {
      const char* start = s_.c_str() + i_;
      char* end = nullptr;
      v.number = std::strtod(start, &end);
      if (end == start) Fail("unexpected character");
      v.type = Value::Type::kNumber;
      i_ += static_cast<size_t>(end - start);
    }
    return v;
  }

  std::string ParseString() {
    if (i_ >= s_.size() || s_[i_] != '"') Fail("expected a string");
    ++i_;
    std::string out;
    while (true) {
      if (i_ >= s_.size()) Fail("unterminated string");
      char c = s_[i_++];
      if (c == '"') return out;
      if (c != '\\') {
        out += c;
        continue;
      }
      if (i_ >= s_.size()) Fail("unterminated escape");
      char e = s_[i_++];
      switch (e) {
        case '"': case '\\': case '/': out += e; break;
        case 'b': out += '\b'; break;
        case 'f': out += '\f'; break;
        case 'n': out += '\n'; break;
        case 'r': out += '\r'; break;
        case 't': out += '\t'; break;
        case 'u': {
          if (i_ + 4 > s_.size()) Fail("short \\u escape");
          unsigned cp = static_cast<unsigned>(std::stoul(s_.substr(i_, 4), nullptr, 16));
          i_ += 4;
          if (cp < 0x80) {
            out += static_cast<char>(cp);
          } else if (cp < 0x800) {
            out += static_cast<char>(0xC0 | (cp >> 6));
            out += static_cast<char>(0x80 | (cp & 0x3F));
          } else {
            out += static_cast<char>(0xE0 | (cp >> 12));
            out += static_cast<char>(0x80 | ((cp >> 6) & 0x3F));
            out += static_cast<char>(0x80 | (cp & 0x3F));
          }
          break;
        }
        default: Fail("bad escape");
      }
    }
  }

  const std::string& s_;
  size_t i_ = 0;
};

inline Value Parse(const std::string& text) { return Parser(text).Parse(); }

// A value as JSON text again (members in file order; numbers as the shortest round-trip form), for
// handing a part of a vector to another reader (a protobuf message's JSON, say).
inline std::string Dump(const Value& v) {
  switch (v.type) {
    case Value::Type::kNull:
      return "null";
    case Value::Type::kBool:
      return v.boolean ? "true" : "false";
    case Value::Type::kNumber: {
      char buf[32];
      std::snprintf(buf, sizeof buf, "%.17g", v.number);
      return buf;
    }
    case Value::Type::kString: {
      std::string out = "\"";
      for (unsigned char c : v.string) {
        if (c == '"' || c == '\\') {
          out += '\\';
          out += static_cast<char>(c);
        } else if (c < 0x20) {
          char buf[8];
          std::snprintf(buf, sizeof buf, "\\u%04x", c);
          out += buf;
        } else {
          out += static_cast<char>(c);
        }
      }
      return out + "\"";
    }
    case Value::Type::kArray: {
      std::string out = "[";
      for (size_t i = 0; i < v.array.size(); ++i) out += (i ? "," : "") + Dump(v.array[i]);
      return out + "]";
    }
    case Value::Type::kObject: {
      std::string out = "{";
      for (size_t i = 0; i < v.object.size(); ++i) {
        Value key;
        key.type = Value::Type::kString;
        key.string = v.object[i].first;
        out += (i ? "," : "") + Dump(key) + ":" + Dump(v.object[i].second);
      }
      return out + "}";
    }
  }
  return "null";
}

}  // namespace json_lite
