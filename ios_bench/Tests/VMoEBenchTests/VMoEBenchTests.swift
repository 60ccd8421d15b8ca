import Foundation
import XCTest

@testable import VMoEBench

/// Runs the benchmark from environment variables. With xcodebuild, set them with the TEST_RUNNER_ prefix
/// (xcodebuild strips it and passes the rest to the test process):
///   VMOE_MODEL           the .mlpackage: a file name under Tests/VMoEBenchTests/Models (bundled), or a path (macOS)
///   VMOE_SIDECAR         its export sidecar (FILE.mlpackage.json), a name under Models/ or a path: the images'
///                        preprocessing (resize the shorter side, centre crop, normalise)
///   VMOE_IMAGES          a directory of images under Models/ (or a path); index.txt gives their order.
///                        Iteration i runs on image i mod N; without it, one random input
///   VMOE_COMPUTE_UNITS   all | cpuOnly | cpuAndGPU | cpuAndNeuralEngine (default all)
///   VMOE_WARMUP          warm-up predictions (default 10)
///   VMOE_ITERATIONS      timed predictions (default 50)
///   VMOE_OUTPUT          where to write the JSON (default Documents/VMOE_RESULT_NAME)
///   VMOE_RESULT_NAME     file name in Documents (default vmoe_bench.json)
final class VMoEBenchTests: XCTestCase {
    /// A path, else a resource bundled under Models/ (what `mobile-vmoe bench --target ios` stages there).
    func resolve(_ spec: String, _ what: String) throws -> URL {
        if FileManager.default.fileExists(atPath: spec) { return URL(fileURLWithPath: spec) }
        if let url = Bundle.module.url(forResource: spec, withExtension: nil, subdirectory: "Models") { return url }
        throw BenchError.modelNotFound("\(what) \(spec) (neither a path nor a resource under Models/)")
    }

    func testBenchmark() async throws {
        let env = ProcessInfo.processInfo.environment
        guard let spec = env["VMOE_MODEL"], !spec.isEmpty else {
            throw XCTSkip("set VMOE_MODEL (TEST_RUNNER_VMOE_MODEL with xcodebuild) to run the benchmark")
        }
        let config = BenchConfig(
            modelURL: try resolve(spec, "model"),
            computeUnits: env["VMOE_COMPUTE_UNITS"] ?? "all",
            warmup: Int(env["VMOE_WARMUP"] ?? "") ?? 10,
            iterations: Int(env["VMOE_ITERATIONS"] ?? "") ?? 50,
            sidecarURL: try env["VMOE_SIDECAR"].flatMap { $0.isEmpty ? nil : $0 }.map { try resolve($0, "sidecar") },
            imagesURL: try env["VMOE_IMAGES"].flatMap { $0.isEmpty ? nil : $0 }.map { try resolve($0, "images") }
        )
        let result = try await CoreMLBenchmark.run(config)
        let out =
            env["VMOE_OUTPUT"].map { URL(fileURLWithPath: $0) }
            ?? ResultWriter.documentsURL(name: env["VMOE_RESULT_NAME"] ?? "vmoe_bench.json")
        let data = try ResultWriter.write(result, to: out)

        // Three ways for the host to get the result: the file (devicectl copy from), the log, the .xcresult.
        print(ResultWriter.beginMarker)
        print(String(decoding: data, as: UTF8.self))
        print(ResultWriter.endMarker)
        let attachment = XCTAttachment(data: data, uniformTypeIdentifier: "public.json")
        attachment.name = out.lastPathComponent
        attachment.lifetime = .keepAlways
        add(attachment)

        XCTAssertEqual(result.samplesMs.count, config.iterations)
        XCTAssertEqual(result.stats, Stats(samples: result.samplesMs))
        XCTAssertGreaterThan(result.coldLoadMs, 0)
        XCTAssertEqual(result.input.source, config.imagesURL == nil ? "random" : "images")
        let decoded = try JSONDecoder().decode(BenchResult.self, from: data)
        XCTAssertEqual(decoded.schemaVersion, "1.0")
    }

    func testResampleTapsFollowPIL() {
        // Shrinking 4 -> 2 bilinear (PIL's coefficients): the triangle stretched x2, centred at 1.0, over inputs
        // 0, 1, 2 with raw weights 0.75, 0.75, 0.25 -> 3/7, 3/7, 1/7.
        let taps = resampleTaps(inSize: 4, outSize: 2, filter: "bilinear")
        XCTAssertEqual(taps[0].start, 0)
        XCTAssertEqual(taps[0].weights.count, 3)
        XCTAssertEqual(taps[0].weights[0], 3.0 / 7.0, accuracy: 1e-6)
        XCTAssertEqual(taps[0].weights[2], 1.0 / 7.0, accuracy: 1e-6)
        XCTAssertEqual(taps[1].start, 1)
        // PIL's nearest takes input 14 for output 13 of 40 -> 36 (13.5 * 40 / 36 accumulates to just under 15).
        XCTAssertEqual(resampleTaps(inSize: 40, outSize: 36, filter: "nearest")[13].start, 14)
        // Same size: every filter is the identity.
        for filter in Preprocess.interpolations {
            for (i, t) in resampleTaps(inSize: 5, outSize: 5, filter: filter).enumerated() {
                let w = t.weights
                XCTAssertEqual(w[i - t.start], 1, accuracy: 1e-6)
                XCTAssertEqual(w.reduce(0, +), 1, accuracy: 1e-6)
            }
        }
        XCTAssertEqual(kernel("bicubic", 0), 1)
        XCTAssertEqual(kernel("bicubic", 1), 0)
        XCTAssertEqual(kernel("bicubic", 1.5), -0.0625, accuracy: 1e-12)
    }

    func testResizeAndCropFollowPILAndTorchvision() throws {
        // 6 x 4 image (red = 0...23), resize 3 (shorter side) -> 4 x 3, centre crop 2: left = round(1.0) = 1,
        // top = round(0.5) = 0. PIL + torchvision give [[2, 3], [14, 15]].
        var planes = [Float](repeating: 0, count: 3 * 6 * 4)
        for i in 0..<(6 * 4) { planes[i] = Float(i) }
        let image = RGBImage(width: 6, height: 4, planes: planes)
        let pre = Preprocess(size: 2, resize: 3, interpolation: "nearest", mean: [0, 0, 0], std: [1, 1, 1])
        try pre.validate("test")
        let resized = image.resized(width: 4, height: 3, filter: "nearest")
        XCTAssertEqual(Array(resized.planes[0..<12]), [0, 2, 3, 5, 12, 14, 15, 17, 18, 20, 21, 23])
        let crop = resized.cropped(left: 1, top: 0, width: 2, height: 2)
        XCTAssertEqual(Array(crop.planes[0..<4]), [2, 3, 14, 15])
        XCTAssertEqual(pre.normalised(crop)[1], 3.0 / 255.0, accuracy: 1e-6)
        XCTAssertThrowsError(
            try Preprocess(size: 4, resize: 3, interpolation: "bicubic", mean: [0, 0, 0], std: [1, 1, 1]).validate("x"))
    }

    func testStatsFollowNumpyConventions() {
        // numpy.percentile([4, 1, 3, 2, 10], [50, 90, 99]) == [3.0, 7.6, 9.76]; np.std (ddof=0)
        let s = Stats(samples: [4, 1, 3, 2, 10])
        XCTAssertEqual(s.count, 5)
        XCTAssertEqual(s.p50, 3.0, accuracy: 1e-12)
        XCTAssertEqual(s.p90, 7.6, accuracy: 1e-12)
        XCTAssertEqual(s.p99, 9.76, accuracy: 1e-12)
        XCTAssertEqual(s.mean, 4.0, accuracy: 1e-12)
        XCTAssertEqual(s.std, (50.0 / 5.0).squareRoot(), accuracy: 1e-12)
        XCTAssertEqual(s.min, 1)
        XCTAssertEqual(s.max, 10)
    }

    func testResultEncodesNullsExplicitly() throws {
        let json = try JSONSerialization.jsonObject(
            with: ResultWriter.encode(
                BenchResult(
                    createdAt: "2024-01-01T00:00:00Z", harness: Harness(isolatedProcess: false),
                    device: Device(model: "iPhone16,1", os: "iOS", osVersion: "17.5.0", chip: nil, cpuCount: 6),
                    runtime: Runtime(name: "coreml", version: "17.5.0"),
                    backend: Backend(name: "coreml", computeUnits: "all", threads: nil, delegates: [], computePlan: nil),
                    model: ModelInfo(path: "m.mlpackage", format: "mlpackage", sizeBytes: 1, name: nil, sidecar: nil,
                                     routing: nil),
                    precision: nil, input: InputInfo(shape: [1, 3, 32, 32], dtype: "float32", source: "random", images: nil),
                    warmupIterations: 0, timedIterations: 1, coldLoadMs: 1, loadBreakdownMs: ["load": 1],
                    firstInferenceMs: 1, samplesMs: [1], stats: Stats(samples: [1]), memory: Memory(),
                    thermalBefore: nil, thermalAfter: nil, latencyPerExpert: nil, notes: []))) as! [String: Any]
        XCTAssertTrue(json["precision"] is NSNull)
        XCTAssertTrue(json["latency_per_expert"] is NSNull)
        XCTAssertTrue((json["device"] as! [String: Any])["chip"] is NSNull)
        XCTAssertEqual(json["schema_version"] as? String, "1.0")
    }
}
